"""Effective settings from flags, `-o` options, environment and a TOML file, in that order.

Flags (and `-o key=value` mount-helper options, which are flags by another spelling) win over
environment variables, which win over the config file, which wins over the defaults. Each
value remembers where it came from, so `--print-config` can say why a setting is what it is.
The API key is never a setting: it comes from MINERVA_API_KEY, a key file only its owner can
read, or systemd credentials, and is shown masked.

SETTINGS below is the only place a setting is declared: the argparse flags (cli.py), `-o`
keys, environment variables, config-file keys, `--print-config`, `--help` and the daemon's
defaults (daemon.Settings) all come from it, and tests/unit/test_config.py holds the README
table to it. Adding a setting is one line there (plus reading it where it is used).
"""

import os
import stat
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import paths

CREDENTIAL_NAME = "minerva-api-key"  # LoadCredential=minerva-api-key:... in the unit
METAVARS = {float: "SECONDS", Path: "FILE", str: "VALUE"}


class ConfigError(Exception):
    """A setting cannot be used; the message says which and why."""


@dataclass(frozen=True)
class Setting:
    """One setting, in every spelling: file and `-o` key, flags, environment, type, default, help.

    `flags` and `env` are derived from the name unless given (`--stop-timeout`,
    `MINERVA_STOP_TIMEOUT`), so that a new setting cannot be spelled two ways by accident;
    `flags=()` marks the positional argument. `kind` (bool, float, str or Path) says how text
    from any source is converted. A default of None means unset, and `unset` says in words
    what happens then (stderr, AWS, ...), for `--help`, `--print-config` and the README.
    """

    name: str
    kind: type
    default: Any
    help: str
    unset: str = ""
    flags: tuple[str, ...] | None = None
    env: tuple[str, ...] | None = None
    metavar: str = ""

    def __post_init__(self) -> None:
        if self.flags is None:
            object.__setattr__(self, "flags", ("--" + self.name.replace("_", "-"),))
        if self.env is None:
            object.__setattr__(self, "env", ("MINERVA_" + self.name.upper(),))
        if not self.metavar and self.kind is not bool:
            object.__setattr__(self, "metavar", METAVARS[self.kind])

    @property
    def option_keys(self) -> frozenset[str]:
        """Keys accepted in `-o`: the name and each long flag (`-o verbose` is `--verbose`)."""
        if not self.flags:
            return frozenset()  # the mount point is mount(8)'s own argument, never an option
        return frozenset({self.name} | {f[2:].replace("-", "_") for f in self.flags if f.startswith("--")})

    @property
    def default_text(self) -> str:
        """The default as a person reads it, the same in `--help`, `--print-config` and README."""
        if self.default is None:
            return self.unset
        if self.kind is bool:
            return "true" if self.default else "false"
        if self.kind is float:
            return f"{self.default:g}"
        return str(self.default)

    @property
    def help_text(self) -> str:
        """The `--help` line: what it does, then where else it can be set and its default."""
        return f"{self.help} (env {', '.join(self.env)}; default {self.default_text})"


SETTINGS = (
    Setting("mountpoint", Path, "~/minerva", "an empty folder to mount on", flags=()),
    Setting("api_url", str, "https://api.minerva.io", "the Minerva API", metavar="URL"),
    Setting("api_key_file", Path, None, "file holding the API key, readable by you alone; "
            "MINERVA_API_KEY or a systemd credential can hold the key instead",
            "~/.config/minerva-mount/api-key"),
    Setting("s3_endpoint_url", str, None, "S3 endpoint, e.g. the local Minerva's", "AWS",
            env=("MINERVA_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"), metavar="URL"),
    Setting("allow_other", bool, False,
            "let other users see the mount (needs user_allow_other in /etc/fuse.conf)"),
    Setting("log_file", Path, None, "where the log goes",
            "stderr with --foreground, else ~/.local/state/minerva-mount/minerva-mount.log"),
    Setting("debug", bool, False, "also log each S3 request", flags=("-v", "--verbose", "--debug")),
    Setting("stop_timeout", float, 900.0,
            "seconds uploads in progress may take to finish after SIGTERM or SIGINT"),
    Setting("credential_wait", float, 60.0, "seconds an operation waits for valid credentials "
            "while the Minerva API fails, before it fails with EIO"),
    Setting("s3_retry_timeout", float, 60.0, "seconds an S3 request is retried while S3 is "
            "unreachable or failing, before it fails with EIO"),
    Setting("cache_dir", Path, None, "block cache and staging folder",
            "$XDG_CACHE_HOME/minerva-mount, i.e. ~/.cache/minerva-mount", metavar="DIR"),
    Setting("cache_size", str, "10G", "block cache cap, e.g. 512M or 10G", metavar="SIZE"),
    Setting("write_back", bool, False, "close() returns once a file is durable on local disk; "
            "uploads go on in the background (see: minerva-mount sync)"),
    Setting("spool_size", str, "4G", "write-back spool cap: a close that would pass it waits "
            "for uploads, e.g. 512M or 4G", metavar="SIZE"),
    Setting("metadata_ttl", float, 30.0,
            "seconds folder listings and attributes are trusted without asking S3"),
    Setting("refresh_interval", float, 10.0,
            "seconds before a folder in use is re-listed, so changes made elsewhere show (then less "
            "often while it is unchanged: SEMANTICS.md, Consistency)"),
)
BY_NAME = {s.name: s for s in SETTINGS}
DEFAULTS = {s.name: s.default for s in SETTINGS}  # as written in SETTINGS (unconverted: "~/minerva")
OPTION_KEYS = {key: s.name for s in SETTINGS for key in s.option_keys}

# Options mount(8) and mount.fuse3 hand to every helper; they mean nothing here.
IGNORED_OPTIONS = {"rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "auto", "noauto",
                   "user", "nouser", "users", "owner", "group", "_netdev", "nofail", "defaults",
                   "async", "sync", "atime", "noatime", "relatime", "nodiratime"}


@dataclass
class Config:
    values: dict[str, Any]
    sources: dict[str, str]
    file: Path
    key_source: "KeySource | None" = None
    notes: list[str] = field(default_factory=list)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None


def _convert(setting: Setting, value: Any, origin: str) -> Any:
    if value is None:
        return None
    try:
        if isinstance(value, bool) and setting.kind is not bool:  # `-o stop_timeout`, `= true`
            raise ConfigError(f"{setting.name} from {origin}: needs a {setting.kind.__name__} value")
        if setting.kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on", ""):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if setting.kind is float:
            return float(value)
        if setting.kind is Path:
            return Path(os.path.abspath(os.path.expanduser(str(value))))
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{setting.name} from {origin}: {value!r} is not a valid "
                          f"{setting.kind.__name__}") from None


def parse_mount_options(options: list[str] | None) -> dict[str, Any]:
    """`-o allow_other,api_url=https://...`: mount-helper options mapped to settings."""
    found: dict[str, Any] = {}
    for group in options or ():
        for item in filter(None, (part.strip() for part in group.split(","))):
            key, has_value, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if key in IGNORED_OPTIONS or key.startswith(("x_", "comment")):
                continue
            if key == "api_key":
                raise ConfigError(f"-o {key}: the API key never goes on a command line; "
                                  "use api_key_file=FILE")
            if key not in OPTION_KEYS:
                raise ConfigError(f"-o {item.split('=')[0]}: unknown option (known: "
                                  f"{', '.join(sorted(OPTION_KEYS))})")
            key = OPTION_KEYS[key]
            found[key] = value if has_value else True
    return found


def read_file(path: Path, required: bool) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file {path} does not exist") from None
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    doc = {k.replace("-", "_"): v for k, v in doc.items()}
    if "api_key" in doc:
        raise ConfigError(f"config file {path}: api_key does not belong in a config file; "
                          "put the key in a file of its own and set api_key_file")
    unknown = sorted(set(doc) - set(BY_NAME))
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting {unknown[0]!r} "
                          f"(known: {', '.join(BY_NAME)})")
    return doc


def load(flags: Mapping[str, Any], env: Mapping[str, str] | None = None,
         config_path: Path | None = None) -> Config:
    """The effective settings. `flags` holds only what the command line set (None = unset)."""
    env = os.environ if env is None else env
    if config_path is not None:
        file, required = config_path, True
    elif env.get("MINERVA_CONFIG"):
        file, required = Path(env["MINERVA_CONFIG"]), True
    else:
        file, required = paths.config_file(), False
    file = Path(os.path.expanduser(str(file)))
    from_file = read_file(file, required)
    values, sources = {}, {}
    for s in SETTINGS:
        if flags.get(s.name) is not None:
            values[s.name], sources[s.name] = _convert(s, flags[s.name], "the command line"), "command line"
            continue
        var = next((v for v in s.env if env.get(v)), None)
        if var is not None:
            values[s.name], sources[s.name] = _convert(s, env[var], var), f"env {var}"
        elif s.name in from_file:
            values[s.name], sources[s.name] = _convert(s, from_file[s.name], str(file)), str(file)
        else:
            values[s.name], sources[s.name] = _convert(s, s.default, "default"), "default"
    config = Config(values, sources, file)
    config.key_source = find_key(config, env)
    return config


# ----- the API key ---------------------------------------------------------------------------

@dataclass(frozen=True)
class KeySource:
    """Where the key comes from: an environment variable or a file."""

    description: str
    path: Path | None = None
    env_var: str | None = None


def find_key(config: Config, env: Mapping[str, str]) -> KeySource | None:
    """Flags first, then MINERVA_API_KEY, then systemd credentials, then the file's setting."""
    origin = config.sources["api_key_file"]
    if config.api_key_file is not None and origin == "command line":
        return KeySource(f"--api-key-file {config.api_key_file}", config.api_key_file)
    if env.get("MINERVA_API_KEY", "").strip():
        return KeySource("env MINERVA_API_KEY", env_var="MINERVA_API_KEY")
    if config.api_key_file is not None and origin.startswith("env"):
        return KeySource(f"{origin}: {config.api_key_file}", config.api_key_file)
    creds = env.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / CREDENTIAL_NAME).exists():
        return KeySource(f"systemd credential {CREDENTIAL_NAME}", Path(creds) / CREDENTIAL_NAME)
    if config.api_key_file is not None:
        return KeySource(f"api_key_file in {origin}: {config.api_key_file}", config.api_key_file)
    if paths.default_key_file().exists():
        return KeySource(f"default key file {paths.default_key_file()}", paths.default_key_file())
    return None


def read_key_file(path: Path) -> str:
    """The key, refusing a file others can read, as ssh refuses a loose private key."""
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"{path} is readable by others (mode {stat.S_IMODE(mode):o}); "
                              f"run: chmod 600 {path}")
        key = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read API key file {path}: {exc.strerror}") from None
    if not key:
        raise ConfigError(f"API key file {path} is empty")
    return key


def load_key(config: Config, env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    source = config.key_source
    if source is None:
        raise ConfigError(f"no API key: set MINERVA_API_KEY, pass --api-key-file FILE, or put it in "
                          f"{paths.default_key_file()} (chmod 600)")
    if source.env_var:
        return env[source.env_var].strip()
    return read_key_file(source.path)


# ----- showing it ----------------------------------------------------------------------------

def mask_url(url: str) -> str:
    """An URL with any password in it replaced by ****."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:****@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def describe(config: Config) -> str:
    """The effective settings as TOML, each with its source; the key masked."""
    lines = [f"# effective settings: command line > environment > {config.file} > defaults"]
    rows = []
    for s in SETTINGS:
        value = config.values[s.name]
        if value is None:
            rows.append((f"# {s.name} =", f"{config.sources[s.name]}: {s.unset}"))
            continue
        if s.kind is bool:
            shown = "true" if value else "false"
        elif s.kind is float:
            shown = f"{value:g}"
        else:
            shown = '"' + str(mask_url(str(value)) if s.kind is str else value).replace('"', '\\"') + '"'
        rows.append((f"{s.name} = {shown}", config.sources[s.name]))
    key = config.key_source
    rows.append(('# api_key = "********"' if key else "# api_key: none",
                 f"from {key.description}" if key else "set MINERVA_API_KEY or api_key_file"))
    width = max(len(r[0]) for r in rows)
    lines += [f"{left.ljust(width)}  # {right}" for left, right in rows]
    return "\n".join(lines)
