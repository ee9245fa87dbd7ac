"""Settings precedence (flags > env > file > defaults), -o options, and where the key comes from."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from minerva_mount import config
from minerva_mount.config import ConfigError, load, load_key, parse_mount_options


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty home: no config file, no key file, XDG paths under it."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("XDG_CONFIG_HOME", "XDG_STATE_HOME", "XDG_RUNTIME_DIR", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def write_config(home: Path, text: str) -> Path:
    path = home / ".config" / "minerva-mount" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_without_file_env_or_flags(home):
    c = load({}, {})
    assert c.api_url == "https://api.minerva.io"
    assert c.mountpoint == home / "minerva"
    assert c.allow_other is False and c.debug is False and c.s3_endpoint_url is None
    assert c.sources["api_url"] == "default"
    assert c.file == home / ".config" / "minerva-mount" / "config.toml"


def test_flags_win_over_env_and_env_over_file(home):
    file = write_config(home, 'api_url = "https://file.example"\ns3_endpoint_url = "http://file:1"\n'
                              'stop_timeout = 5\nallow_other = true\nmountpoint = "~/from-file"\n')
    env = {"MINERVA_API_URL": "https://env.example", "AWS_ENDPOINT_URL_S3": "http://env:2",
           "MINERVA_STOP_TIMEOUT": "7"}
    c = load({"api_url": "https://flag.example"}, env)
    assert c.api_url == "https://flag.example" and c.sources["api_url"] == "command line"
    assert c.s3_endpoint_url == "http://env:2" and c.sources["s3_endpoint_url"] == "env AWS_ENDPOINT_URL_S3"
    assert c.stop_timeout == 7.0
    assert c.allow_other is True and c.sources["allow_other"] == str(file)
    assert c.mountpoint == home / "from-file"


def test_xdg_config_home_and_explicit_config_file(home, tmp_path, monkeypatch):
    xdg = tmp_path / "xdg"
    (xdg / "minerva-mount").mkdir(parents=True)
    (xdg / "minerva-mount" / "config.toml").write_text('api_url = "https://xdg.example"\n')
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    assert load({}, {}).api_url == "https://xdg.example"
    other = tmp_path / "other.toml"
    other.write_text('api_url = "https://other.example"\n')
    assert load({}, {"MINERVA_CONFIG": str(other)}).api_url == "https://other.example"
    with pytest.raises(ConfigError, match="does not exist"):
        load({}, {}, tmp_path / "missing.toml")


def test_bad_file_names_the_problem(home):
    write_config(home, "api_ur = 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'api_ur'"):
        load({}, {})
    write_config(home, 'api_key = "mk_secret"\n')
    with pytest.raises(ConfigError, match="does not belong in a config file") as info:
        load({}, {})
    assert "mk_secret" not in str(info.value)
    write_config(home, "allow_other = maybe\n")
    with pytest.raises(ConfigError, match="config.toml"):
        load({}, {})
    write_config(home, 'allow_other = "maybe"\n')
    with pytest.raises(ConfigError, match="allow_other .* not a valid bool"):
        load({}, {})
    write_config(home, "stop_timeout = true\n")
    with pytest.raises(ConfigError, match="stop_timeout .* needs a float value"):
        load({}, {})


def test_mount_options_map_to_settings_and_ignore_mount_generic_ones():
    assert parse_mount_options(["allow_other,api-url=https://o.example", "rw,nodev,nosuid,noauto,user,"
                                "_netdev,x-systemd.automount,verbose,stop_timeout=3"]) == {
        "allow_other": True, "api_url": "https://o.example", "debug": True, "stop_timeout": "3"}
    with pytest.raises(ConfigError, match="unknown option"):
        parse_mount_options(["colour=blue"])
    with pytest.raises(ConfigError, match="never goes on a command line") as info:
        parse_mount_options(["api_key=mk_secret"])
    assert "mk_secret" not in str(info.value)


def _key_file(path: Path, text: str = "mk_from_file", mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


def test_key_sources_in_order(home, tmp_path):
    flag_file = _key_file(tmp_path / "flag-key", "mk_flag")
    env_file = _key_file(tmp_path / "env-key", "mk_env_file")
    creds = tmp_path / "creds"
    _key_file(creds / "minerva-api-key", "mk_systemd")
    conf_file = _key_file(tmp_path / "conf-key", "mk_conf")
    _key_file(home / ".config" / "minerva-mount" / "api-key", "mk_default")
    write_config(home, f'api_key_file = "{conf_file}"\n')
    full = {"MINERVA_API_KEY": "mk_env", "MINERVA_API_KEY_FILE": str(env_file),
            "CREDENTIALS_DIRECTORY": str(creds)}

    def key(flags, env):
        return load_key(load(flags, env), env)
    assert key({"api_key_file": str(flag_file)}, full) == "mk_flag"
    assert key({}, full) == "mk_env"
    del full["MINERVA_API_KEY"]
    assert key({}, full) == "mk_env_file"
    del full["MINERVA_API_KEY_FILE"]
    assert key({}, full) == "mk_systemd"
    assert key({}, {}) == "mk_conf"
    write_config(home, "")
    assert key({}, {}) == "mk_default"
    (home / ".config" / "minerva-mount" / "api-key").unlink()
    with pytest.raises(ConfigError, match="no API key"):
        key({}, {})


def test_key_file_readable_by_group_is_refused(home, tmp_path):
    loose = _key_file(tmp_path / "loose", "mk_loose", 0o640)
    with pytest.raises(ConfigError, match="chmod 600") as info:
        load_key(load({"api_key_file": str(loose)}, {}), {})
    assert "mk_loose" not in str(info.value)


def test_print_config_shows_sources_and_masks_secrets(home, tmp_path):
    write_config(home, 'api_url = "https://file.example"\n')
    env = {**os.environ, "MINERVA_API_KEY": "mk_very_secret_key",
           "AWS_ENDPOINT_URL_S3": "http://user:hunter2@127.0.0.1:9000"}
    out = subprocess.run([sys.executable, "-m", "minerva_mount", "--print-config", "-o", "allow_other",
                          "--stop-timeout", "12", str(tmp_path / "mnt")],
                         capture_output=True, text=True, env=env, timeout=60, check=True).stdout
    assert "mk_very_secret_key" not in out and "hunter2" not in out
    assert 'api_key = "********"' in out and "env MINERVA_API_KEY" in out
    assert 'api_url = "https://file.example"' in out and "config.toml" in out
    assert "http://user:****@127.0.0.1:9000" in out
    assert "allow_other = true" in out and "stop_timeout = 12" in out
    assert f'mountpoint = "{tmp_path / "mnt"}"' in out


def test_mask_url_keeps_urls_without_password():
    assert config.mask_url("https://api.minerva.io") == "https://api.minerva.io"


# ----- one table: every spelling of every setting, and the docs, agree with config.SETTINGS -----

ROOT = Path(__file__).resolve().parents[2]


def _sample(s: config.Setting, home: Path) -> tuple[str, object]:
    """A value other than the default, as text (flag, -o, env) and as it should come out."""
    if s.kind is bool:
        return "true", not s.default
    if s.kind is float:
        return "7.5", 7.5
    if s.kind is Path:
        return str(home / "given" / s.name), home / "given" / s.name
    return f"given-{s.name}", f"given-{s.name}"


def _toml(s: config.Setting, text: str) -> str:
    return text if s.kind in (bool, float) else f'"{text}"'


@pytest.mark.parametrize("s", config.SETTINGS, ids=lambda s: s.name)
def test_every_setting_as_flag_option_env_and_file_key_with_one_default(s, home, monkeypatch):
    from minerva_mount import cli

    for var in (v for setting in config.SETTINGS for v in setting.env):
        monkeypatch.delenv(var, raising=False)
    text, value = _sample(s, home)
    default = load({}, {})
    assert default.sources[s.name] == "default"
    assert default.values[s.name] == config._convert(s, s.default, "default")
    assert (s.default is None) == bool(s.unset), "a default of None needs `unset` words, and only it"
    for var in s.env:
        c = load({}, {var: text})
        assert (c.values[s.name], c.sources[s.name]) == (value, f"env {var}")
    file = write_config(home, f"{s.name} = {_toml(s, text)}\n")
    c = load({}, {})
    assert (c.values[s.name], c.sources[s.name]) == (value, str(file))
    write_config(home, "")
    spellings = [[flag] if s.kind is bool else [flag, text] for flag in s.flags]
    spellings += [["-o", key if s.kind is bool else f"{key}={text}"] for key in s.option_keys]
    if s.name == "mountpoint":
        spellings.append([text])
        with pytest.raises(ConfigError, match="unknown option"):
            parse_mount_options([f"mountpoint={text}"])
    else:
        assert s.flags and s.name in s.option_keys
    for argv in spellings:
        c = cli.load_config(cli._parser().parse_args(argv))
        assert (c.values[s.name], c.sources[s.name]) == (value, "command line"), argv
        assert all(c.sources[o] == "default" for o in config.BY_NAME if o != s.name), argv


def test_help_says_what_the_table_says(monkeypatch):
    from minerva_mount import cli

    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps (and splits at hyphens) below that
    text = " ".join(cli._parser().format_help().split())
    for s in config.SETTINGS:
        assert " ".join(s.help_text.split()) in text, s.name
        assert all(f in text for f in s.flags), s.name


def _readme_section() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("\n## Configuration\n")
    return readme[start:readme.index("\n## ", start + 1)]


def _row(s: config.Setting) -> str:
    """The README row the table implies (shown when the README disagrees; backticks are free)."""
    alias = "".join(f" (`-o {a}`)" for a in sorted(s.option_keys - {s.name}))
    flags = ", ".join(f"`{f} {s.metavar}`" if s.metavar and f.startswith("--") else f"`{f}`"
                      for f in s.flags) or "the argument"
    return (f"| `{s.name}`{alias} | {flags} | {', '.join(f'`{e}`' for e in s.env)} | "
            f"{s.default_text} | {s.help} |")


def test_readme_table_lists_exactly_the_settings_with_their_defaults():
    rows = [line for line in _readme_section().splitlines() if line.startswith("| `")]
    cells = [[c.strip() for c in row.strip("|").split(" | ")] for row in rows]
    names = [re.match(r"`(\w+)`", c[0]).group(1) for c in cells]
    assert names == [s.name for s in config.SETTINGS], "README rows, in order:\n" + "\n".join(
        _row(s) for s in config.SETTINGS)
    for s, (name, flags, env, default, meaning) in zip(config.SETTINGS, cells, strict=True):
        expected = f"README should say:\n{_row(s)}"
        assert re.findall(r"-o (\w+)", name) == sorted(s.option_keys - {s.name}), expected
        assert re.findall(r"`(-[-\w]+)", flags) == list(s.flags), expected
        assert s.flags or flags == "the argument", expected
        assert re.findall(r"`(\w+)`", env) == list(s.env), expected
        assert default.replace("`", "") == s.default_text, expected
        assert meaning.replace("`", "") == s.help, expected


def test_defaults_quoted_in_prose_are_the_tables():
    """`--metadata-ttl` (default 30 s) in SEMANTICS.md or README.md is the table's default."""
    flags = {f: s for s in config.SETTINGS for f in s.flags}
    for doc in ("README.md", "SEMANTICS.md"):
        for flag, quoted in re.findall(r"`(--[\w-]+)`\s+\(default ([^\s)]+)", (ROOT / doc).read_text()):
            assert quoted == flags[flag].default_text, f"{doc}: {flag} (default {quoted})"


def test_readme_example_config_file_is_accepted(home):
    example = re.search(r"```toml\n(.*?)```", _readme_section(), re.S).group(1)
    write_config(home, example)
    assert set(config.read_file(config.paths.config_file(), True)) <= set(config.BY_NAME)
    load({}, {})


def test_daemon_settings_restate_no_default():
    """daemon.Settings fields named like settings take the table's defaults, never a literal."""
    tree = ast.parse((ROOT / "minerva_mount" / "daemon.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Settings")
    for item in cls.body:
        if isinstance(item, ast.AnnAssign) and item.target.id in config.BY_NAME and item.value:
            assert "DEFAULTS[" in ast.unparse(item.value), ast.unparse(item)
