"""Command line: `minerva-mount MOUNTPOINT` and `minerva-mount local-server`.

Without --foreground the command starts the daemon as a child process and returns once the
mount is live (or prints why it is not). The API key reaches the child on its stdin, never
through argv or the environment, so it cannot be read from /proc by other users.
"""

import argparse
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import trio

from .credentials import CredentialError
from .daemon import MountError, Settings, serve

DEFAULT_API_URL = "https://api.minerva.io"
log = logging.getLogger("minerva.cli")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["local-server"]:
        from .local import server  # only needed for the local Minerva

        return server.main(argv[1:])
    return mount_main(argv)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="minerva-mount",
        description="Mount your Minerva storage area (Incoming/, Outgoing/) as a local folder.",
        epilog="Also: 'minerva-mount local-server --state-dir DIR' runs a local Minerva to try it.")
    p.add_argument("mountpoint", help="an empty folder to mount on, e.g. ~/minerva")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument("--api-url", default=os.environ.get("MINERVA_API_URL", DEFAULT_API_URL),
                   help="Minerva API (env MINERVA_API_URL; default %(default)s)")
    p.add_argument("--api-key-file", type=Path,
                   help="file holding the API key, readable by you alone (or env MINERVA_API_KEY)")
    p.add_argument("--s3-endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL_S3"),
                   help="S3 endpoint, for the local Minerva (env AWS_ENDPOINT_URL_S3)")
    p.add_argument("--allow-other", action="store_true", help="let other users see the mount")
    p.add_argument("--log-file", type=Path, help="log here (default: stderr in the foreground, "
                   "~/.local/state/minerva-mount/minerva-mount.log otherwise)")
    p.add_argument("--metadata-ttl", type=_seconds, default=30.0, metavar="SECONDS",
                   help="how long folder listings and attributes are trusted (default %(default)s)")
    p.add_argument("--refresh-interval", type=_seconds, default=10.0, metavar="SECONDS",
                   help="how often folders in use are re-listed to show changes made elsewhere "
                   "(default %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true", help="log each request")
    p.add_argument("--api-key-stdin", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    return p


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text}: must be a number of seconds above 0")
    return value


def read_key_file(path: Path) -> str:
    """The key, refusing a file others can read, as ssh refuses a loose private key."""
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SystemExit(f"minerva-mount: {path} is readable by others (mode "
                             f"{stat.S_IMODE(mode):o}); run: chmod 600 {path}")
        key = path.read_text().strip()
    except OSError as exc:
        raise SystemExit(f"minerva-mount: cannot read API key file {path}: {exc.strerror}") from None
    if not key:
        raise SystemExit(f"minerva-mount: API key file {path} is empty")
    return key


def resolve_key(args) -> str:
    if args.api_key_stdin:
        return sys.stdin.readline().strip()
    if args.api_key_file:
        return read_key_file(args.api_key_file)
    key = os.environ.get("MINERVA_API_KEY", "").strip()
    if not key:
        raise SystemExit("minerva-mount: no API key: set MINERVA_API_KEY or pass --api-key-file FILE")
    return key


def default_log_file() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(state) / "minerva-mount" / "minerva-mount.log"


def setup_logging(log_file: Path | None, verbose: bool) -> None:
    handler: logging.Handler
    if log_file:
        log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        handler = logging.FileHandler(log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)


def mount_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    args.mountpoint = os.path.abspath(os.path.expanduser(args.mountpoint))
    key = resolve_key(args)
    if not args.foreground:
        return _start_background(args, argv, key)
    setup_logging(args.log_file, args.verbose)
    settings = Settings(mountpoint=args.mountpoint, api_url=args.api_url,
                        s3_endpoint_url=args.s3_endpoint_url, allow_other=args.allow_other,
                        metadata_ttl=args.metadata_ttl, refresh_interval=args.refresh_interval)

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
        return 1
    return 0


def _expected_failure(exc: BaseException) -> BaseException | None:
    """The configuration or credential error inside `exc` (trio wraps errors in groups)."""
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
