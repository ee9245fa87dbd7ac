"""Command line: `minerva-mount [MOUNTPOINT]`, `status`, `sync`, `unmount`, `install-service`, `local-server`.

Without --foreground the command starts the daemon as a child process and returns once the
mount is live (or prints why it is not). The API key reaches the child on its stdin, never
through argv or the environment, so it cannot be read from /proc by other users. Settings
come from flags, `-o` options, the environment and the config file (config.py).
"""

import argparse
import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path

from . import config as configuration
from .paths import default_log_file

log = logging.getLogger("minerva.cli")
EX_CONFIG = 78  # sysexits.h: the unit does not restart on it (RestartPreventExitStatus)
SUBCOMMANDS = {
    "status": "minerva_mount.commands.status:status_main",
    "unmount": "minerva_mount.commands.status:unmount_main",
    "sync": "minerva_mount.commands.status:sync_main",
    "install-service": "minerva_mount.commands.service:install_main",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["local-server"]:
        from .local import server  # only needed for the local Minerva

        return server.main(argv[1:])
    if argv[:1] and argv[0] in SUBCOMMANDS:
        import importlib

        module, _, function = SUBCOMMANDS[argv[0]].partition(":")
        return getattr(importlib.import_module(module), function)(argv[1:])
    return mount_main(argv)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="minerva-mount",
        usage="%(prog)s [options] [MOUNTPOINT]\n"
              "       %(prog)s status|sync|unmount|install-service [MOUNTPOINT]",
        description="Mount your Minerva storage area (Incoming/, Outgoing/) as a local folder.",
        epilog="Commands: 'status [MOUNTPOINT] [--json]' shows uploads, failures and credentials; "
               "'sync [MOUNTPOINT]' waits until every file closed so far is in S3 (with --write-back, "
               "until the spool is empty; exit 1 if one failed); 'unmount MOUNTPOINT' waits for "
               "uploads, then unmounts; 'install-service [MOUNTPOINT]' "
               "sets up the systemd user service; 'local-server --state-dir DIR' runs a local Minerva "
               "to try it. Settings: flags > environment > config file (--print-config shows them).")
    # [SOURCE] MOUNTPOINT: mount.fuse3 (fstab type fuse.minerva-mount) passes a source first.
    p.add_argument("places", nargs="*", metavar="MOUNTPOINT",
                   help=_escape(configuration.BY_NAME["mountpoint"].help_text))
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    for s in configuration.SETTINGS:  # every setting's flags, from the one table in config.py
        if not s.flags:
            continue
        # Values stay text: config.load converts them as it converts the environment and file.
        kind = {"action": "store_const", "const": True} if s.kind is bool else {"metavar": s.metavar}
        p.add_argument(*s.flags, dest=s.name, help=_escape(s.help_text), **kind)
    p.add_argument("-o", dest="options", action="append", metavar="KEY=VALUE,...",
                   help="any setting above by its config-file name, e.g. "
                   "-o allow_other,api_key_file=~/.minerva-key")
    p.add_argument("--config", type=Path, help="config file (env MINERVA_CONFIG; default "
                   "~/.config/minerva-mount/config.toml)")
    p.add_argument("--print-config", action="store_true", help="show the effective settings and exit")
    p.add_argument("--api-key-stdin", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    return p


def _escape(text: str) -> str:
    return text.replace("%", "%%")  # argparse formats help with %


def load_config(args) -> configuration.Config:
    if len(args.places) > 2:
        raise configuration.ConfigError("expected at most [SOURCE] MOUNTPOINT")
    flags = configuration.parse_mount_options(args.options)
    for s in configuration.SETTINGS:  # flags win over -o, as the later of two spellings
        if s.flags and getattr(args, s.name) is not None:
            flags[s.name] = getattr(args, s.name)
    if args.places:
        flags["mountpoint"] = args.places[-1]
    return configuration.load(flags, os.environ, args.config)


def setup_logging(log_file: Path | None, verbose: bool) -> None:
    """One line per event: time, level, logger, message (journald adds its own time)."""
    handler: logging.Handler
    if log_file:
        log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        log_file.touch(mode=0o600)  # paths of your files are nobody else's business
        handler = logging.FileHandler(log_file)
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        journal = bool(os.environ.get("JOURNAL_STREAM"))
        fmt = ("" if journal else "%(asctime)s ") + "%(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)


def mount_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args)
        if args.print_config:
            print(configuration.describe(config))
            return 0
        key = sys.stdin.readline().strip() if args.api_key_stdin else configuration.load_key(config)
    except configuration.ConfigError as exc:
        print(f"minerva-mount: {exc}", file=sys.stderr)
        return EX_CONFIG
    from .blockcache import parse_size

    sizes = {}
    for name in ("cache_size", "spool_size"):
        try:
            sizes[name] = parse_size(config.values[name])
        except ValueError as exc:
            print(f"minerva-mount: {name}: {exc}", file=sys.stderr)
            return EX_CONFIG
    args.mountpoint = str(config.mountpoint)
    args.log_file = config.log_file
    if not args.foreground:
        return _start_background(args, argv, key)
    import trio  # the daemon's imports (boto3, pyfuse3) load only when mounting: status stays quick

    from .credentials import CredentialError
    from .daemon import MountError, Settings, serve

    setup_logging(args.log_file, config.debug)
    # Every Settings field that is a setting comes from the config, so a new one needs no line here.
    same = {f.name: config.values[f.name] for f in dataclasses.fields(Settings) if f.name in config.values}
    settings = Settings(**same | {"mountpoint": args.mountpoint} | sizes)

    def ready() -> None:
        if args.ready_fd is not None:
            os.write(args.ready_fd, b"ok\n")
            os.close(args.ready_fd)
            args.ready_fd = None

    try:
        trio.run(serve, settings, key, ready)
    except (CredentialError, MountError, ExceptionGroup) as exc:
        cause = _expected_failure(exc)
        if cause is None:
            raise
        message = f"minerva-mount: {cause}"
        logging.getLogger("minerva").error("%s", message)
        if args.ready_fd is not None:
            os.write(args.ready_fd, message.encode() + b"\n")
        if args.log_file:
            print(message, file=sys.stderr)
        # A refused key or unusable mount point stays so; anything else may pass on restart.
        return EX_CONFIG if isinstance(cause, MountError) or getattr(cause, "fatal", False) else 1
    return 0


def _expected_failure(exc: BaseException) -> BaseException | None:
    """The configuration or credential error inside `exc` (trio wraps errors in groups)."""
    from .credentials import CredentialError
    from .daemon import MountError

    if isinstance(exc, CredentialError | MountError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _expected_failure(inner)) is not None:
                return found
    return None


def _start_background(args, argv: list[str], key: str) -> int:
    """Run the daemon as a child with --foreground; return once it says the mount is live."""
    log_file = args.log_file or default_log_file()
    log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    read_end, write_end = os.pipe()
    child_args = [a for a in argv if a not in ("-f", "--foreground")]
    if args.log_file is None:
        child_args += ["--log-file", str(log_file)]
    env = {k: v for k, v in os.environ.items() if k != "MINERVA_API_KEY"}
    child = subprocess.Popen(
        [sys.executable, "-m", "minerva_mount", *child_args, "--foreground",
         "--api-key-stdin", "--ready-fd", str(write_end)],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        pass_fds=(write_end,), start_new_session=True, env=env)
    os.close(write_end)
    child.stdin.write(key.encode() + b"\n")
    child.stdin.close()
    with os.fdopen(read_end, "rb") as ready:
        answer = ready.readline().decode().strip()
    if answer == "ok":
        print(f"minerva-mount: mounted at {args.mountpoint} (pid {child.pid}, log {log_file})")
        return 0
    child.wait()
    print(answer or f"minerva-mount: the daemon exited ({child.returncode}); see {log_file}",
          file=sys.stderr)
    return 1
