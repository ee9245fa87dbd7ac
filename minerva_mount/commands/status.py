"""`minerva-mount status [MOUNTPOINT]` and `minerva-mount unmount MOUNTPOINT`.

Both ask the running daemon over its control socket (control.py) and never touch the mount's
files, so they answer even while a large copy keeps the file system busy. `unmount` waits
until no upload is in flight, showing progress, then runs `fusermount3 -u`: a file still
open makes that fail with "Device or resource busy" instead of cutting an upload short.
"""

import argparse
import datetime as dt
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .. import control, paths

POLL = 0.5


def _fail(message: str, code: int = 1) -> int:
    print(f"minerva-mount: {message}", file=sys.stderr)
    return code


def _mountpoint(text: str) -> str:
    return os.path.abspath(os.path.expanduser(text))


def _dead_mount(mountpoint: str) -> bool:
    """statfs, not stat: the kernel answers stat from its attribute cache for a while."""
    try:
        os.statvfs(mountpoint)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def _not_running(mountpoint: str) -> str:
    if _dead_mount(mountpoint):
        return (f"{mountpoint} is a dead mount (its daemon is gone): run fusermount3 -u {mountpoint}, "
                "then mount again")
    if os.path.ismount(mountpoint):
        return f"{mountpoint} is mounted, but no minerva-mount of yours answers for it"
    return f"nothing is mounted at {mountpoint} by minerva-mount"


def fetch_status(mountpoint: str) -> dict:
    reply = control.request(paths.control_socket(mountpoint, create=False), "status")
    return reply["status"]


def running_mounts() -> list[dict]:
    """Status of every mount whose daemon answers on a socket in the runtime dir."""
    try:
        folder = paths.runtime_dir(create=False)
    except paths.UnsafeRuntimeDir:
        return []
    found = []
    for sock in sorted(folder.glob("control-*.sock")) if folder.exists() else ():
        try:
            found.append(control.request(sock, "status")["status"])
        except control.ControlError:
            continue
    return found


# ----- rendering ---------------------------------------------------------------------------

def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def uploads_table(uploads: list[dict]) -> Table:
    """One row per file: bar of uploaded over written (the total is known only at close)."""
    table = Table(title=f"Uploads in flight: {len(uploads)}", title_justify="left",
                  caption="written: bytes the program wrote so far; the total is known once it closes",
                  caption_justify="left")
    table.add_column("file", overflow="fold", ratio=1)
    table.add_column("progress", width=22, no_wrap=True)
    for name in ("uploaded", "written", "rate", "ETA"):
        table.add_column(name, justify="right", no_wrap=True)
    for u in uploads:
        total = u["total"] if u["total"] is not None else u["written"]
        table.add_row(u["path"], ProgressBar(total=max(total, 1), completed=u["uploaded"], width=20),
                      human_bytes(u["uploaded"]), human_bytes(u["written"]), f"{human_bytes(u['rate'])}/s",
                      human_seconds(u["eta"]) if u["total"] is not None else "writing")
    return table


def _cache_line(cache: dict) -> str:
    parts = [f"{k}={v}" for k, v in cache.items()]
    hits, misses = cache.get("hits"), cache.get("misses")
    if "hit_rate" not in cache and isinstance(hits, int) and isinstance(misses, int) and hits + misses:
        parts.append(f"hit_rate={hits / (hits + misses):.0%}")
    return ", ".join(parts)


def render(report: dict):
    head = Text()
    head.append(f"minerva-mount at {report['mountpoint']}", style="bold")
    head.append(f"\n{report['area']}, pid {report['pid']}, up {human_seconds(report['up_seconds'])}")
    creds = report["credentials"]
    expires = creds["expires"]
    if expires:
        when = dt.datetime.fromisoformat(expires).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
        cred_line = f"Credentials: expire {when} (in {human_seconds(creds['seconds_left'])}), " \
                    f"fetched {creds['refreshes']} times"
    else:
        cred_line = "Credentials: none"
    if creds["last_error"]:
        cred_line += f"; last refresh failed: {creds['last_error']}"
    lines = [head, Text(cred_line),
             Text(f"Uploads completed since start: {report['uploads_completed']}")]
    requests = report["requests"]
    lines.append(Text("Requests: " + (", ".join(f"{k} {v}" for k, v in sorted(requests.items())) or "none")))
    if "cache" in report:
        lines.append(Text("Cache: " + _cache_line(report["cache"])))
    parts = [*lines, uploads_table(report["uploads"])] if report["uploads"] else \
        [*lines, Text("Uploads in flight: none")]
    failures = report["recent_failures"]
    if failures:
        table = Table(title=f"Recent failures (last {len(failures)})", title_justify="left")
        table.add_column("time", no_wrap=True)
        table.add_column("level", no_wrap=True)
        table.add_column("message", overflow="fold", ratio=1)
        for f in failures:
            when = dt.datetime.fromisoformat(f["time"]).astimezone().strftime("%H:%M:%S")
            table.add_row(when, f["level"], f["message"])
        parts.append(table)
    else:
        parts.append(Text("Recent failures: none"))
    return Group(*parts)


# ----- status ------------------------------------------------------------------------------

def status_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="minerva-mount status",
                                description="What the running mount is doing: uploads with progress, "
                                            "recent failures, credentials, requests.")
    p.add_argument("mountpoint", nargs="?", help="the mount to ask (default: the one running)")
    p.add_argument("--json", action="store_true", help="print the status as JSON, for scripts")
    p.add_argument("-w", "--watch", action="store_true", help="keep showing it, refreshed each second")
    args = p.parse_args(argv)
    if args.watch and not args.json:
        return _watch(args.mountpoint)
    if args.mountpoint:
        mountpoint = _mountpoint(args.mountpoint)
        try:
            report = fetch_status(mountpoint)
        except paths.UnsafeRuntimeDir as exc:
            return _fail(str(exc))
        except control.ControlError as exc:
            return _fail(_not_running(mountpoint) if str(exc) == "not running" else str(exc))
    else:
        reports = running_mounts()
        if not reports:
            return _fail("no minerva-mount of yours is running (give the mount point to check one)")
        if len(reports) > 1:
            return _fail("several mounts are running; name one: "
                         + " ".join(r["mountpoint"] for r in reports))
        report = reports[0]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        Console().print(render(report))
    return 0


def _watch(mountpoint: str | None) -> int:
    """Redraw the status every second until Ctrl-C or the mount goes away."""
    if mountpoint is None:
        reports = running_mounts()
        if len(reports) != 1:
            return status_main([])  # says why (none or several)
        mountpoint = reports[0]["mountpoint"]
    mountpoint = _mountpoint(mountpoint)
    try:
        with Live(Text("asking the daemon..."), auto_refresh=False) as live:
            while True:
                live.update(render(fetch_status(mountpoint)), refresh=True)
                time.sleep(1)
    except KeyboardInterrupt:
        return 0
    except control.ControlError as exc:
        return _fail(_not_running(mountpoint) if str(exc) == "not running" else str(exc))


# ----- unmount -----------------------------------------------------------------------------

def _progress_line(report: dict) -> str:
    uploads = report["uploads"]
    return (f"waiting for {len(uploads)} uploads: "
            + "; ".join(f"{u['path']} {human_bytes(u['uploaded'])} of "
                        f"{human_bytes(u['total'] if u['total'] is not None else u['written'])}"
                        for u in uploads))


def wait_for_uploads(mountpoint: str, deadline: float | None, console: Console) -> dict:
    """Poll until no upload is in flight; live bars on a terminal, a line every 5 s otherwise."""
    report = fetch_status(mountpoint)
    if not report["uploads"]:
        return report
    last_line = 0.0
    with Live(uploads_table(report["uploads"]), console=console, auto_refresh=False,
              transient=True) as live:
        while report["uploads"]:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(_progress_line(report))
            if console.is_terminal:
                live.update(uploads_table(report["uploads"]), refresh=True)
            elif time.monotonic() - last_line >= 5:
                print(_progress_line(report), flush=True)
                last_line = time.monotonic()
            time.sleep(POLL)
            report = fetch_status(mountpoint)
    return report


def unmount_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="minerva-mount unmount",
                                description="Wait for uploads in flight to finish, then unmount.")
    p.add_argument("mountpoint", help="the mount point, e.g. ~/minerva")
    p.add_argument("--timeout", type=float, help="give up after this many seconds (default: wait)")
    args = p.parse_args(argv)
    mountpoint = _mountpoint(args.mountpoint)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    console = Console()
    sock = paths.control_socket(mountpoint, create=False)
    while True:
        try:
            report = wait_for_uploads(mountpoint, deadline, console)
        except control.ControlError:
            if not os.path.ismount(mountpoint) and not _dead_mount(mountpoint):
                return _fail(f"nothing is mounted at {mountpoint}")
            report = {"uploads_completed": 0}  # no daemon answers: unmount what is left (a dead mount)
        except TimeoutError as exc:
            return _fail(f"gave up after {args.timeout:g} s, {exc}")
        if report["uploads_completed"]:
            print(f"all uploads done ({report['uploads_completed']} since the mount started)")
        result = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True)
        if result.returncode == 0:
            break
        busy = "busy" in result.stderr.lower()
        try:
            uploading = busy and bool(fetch_status(mountpoint)["uploads"])
        except control.ControlError:
            uploading = False
        if uploading:
            continue  # a new file was opened meanwhile: wait for it as well
        if busy:
            return _fail(f"{mountpoint} is busy: a program still has a file or folder open in it "
                         f"(see: fuser -vm {mountpoint}); close it and run this again")
        if not os.path.ismount(mountpoint) and not _dead_mount(mountpoint):
            return _fail(f"nothing is mounted at {mountpoint}")
        return _fail(f"fusermount3 -u {mountpoint}: {result.stderr.strip()}")
    _wait_gone(sock)
    print(f"unmounted {mountpoint}")
    return 0


def sync_main(argv: list[str]) -> int:
    """`minerva-mount sync [MOUNTPOINT]`: wait until every file closed so far is in S3."""
    p = argparse.ArgumentParser(prog="minerva-mount sync",
                                description="Wait until every file closed so far is in S3 (with "
                                "--write-back, until the spool is empty); exit 1 if one failed.")
    p.add_argument("mountpoint", nargs="?", help="the mount point (default: the only one)")
    p.add_argument("--timeout", type=float, help="give up after this many seconds (default: wait)")
    args = p.parse_args(argv)
    if args.mountpoint is None:
        reports = running_mounts()
        if len(reports) != 1:
            return status_main([])  # says why (none or several)
        args.mountpoint = reports[0]["mountpoint"]
    mountpoint = _mountpoint(args.mountpoint)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    try:
        report = wait_for_uploads(mountpoint, deadline, Console())
    except control.ControlError as exc:
        return _fail(_not_running(mountpoint) if str(exc) == "not running" else str(exc))
    except TimeoutError as exc:
        return _fail(f"gave up after {args.timeout:g} s, {exc}")
    for path in report.get("kept_back", []):
        print(f"kept back (a temporary name, never renamed): {path}")
    if report.get("failed"):
        for failed in report["failed"]:
            print(f"failed: {failed['path']}: {failed['error']}", file=sys.stderr)
        return 1
    print(f"all files are in S3 ({report['uploads_completed']} uploaded since the mount started)")
    return 0


def _wait_gone(sock: Path, timeout: float = 60.0) -> None:
    """The daemon removes its socket as it exits: wait for that (polling, bounded)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            control.request(sock, "status", timeout=2)
        except control.ControlError:
            return
        time.sleep(POLL / 5)
