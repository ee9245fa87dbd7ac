"""What the running mount is doing, as one JSON-ready dict: the answer to `status`.

Read-only and cheap (no I/O, no awaits), so the control task can build it on the event loop
without stalling file system requests. Recent failures come from a logging handler that keeps
the last WARNING-or-worse lines of the mount's own loggers in a bounded deque: every failure
is logged with its path anyway, so this sees exactly what the log says.
"""

import collections
import datetime as dt
import logging
import os
import time

MAX_FAILURES = 20


class RecentFailures(logging.Handler):
    def __init__(self, maxlen: int = MAX_FAILURES):
        super().__init__(logging.WARNING)
        self.entries: collections.deque[dict] = collections.deque(maxlen=maxlen)
        self.errors = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not break logging
            message = str(record.msg)
        if record.levelno >= logging.ERROR:
            self.errors += 1
        self.entries.append({
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="seconds"),
            "level": record.levelname, "logger": record.name, "message": message})

    def install(self) -> "RecentFailures":
        logging.getLogger("minerva").addHandler(self)
        return self

    def remove(self) -> None:
        logging.getLogger("minerva").removeHandler(self)


def upload_entry(held, now: float) -> dict:
    """One held file (localfiles.LocalFile): streamed, staged, kept back, publishing or failed."""
    elapsed = max(now - held.started, 1e-6)
    rate = held.uploaded / elapsed
    closing = held.state.value in ("publishing", "failed", "kept-back") or held.writers == 0
    total = held.size if closing else None
    eta = (total - held.uploaded) / rate if total is not None and rate > 0 else None
    return {"path": held.path, "state": held.state.value, "written": held.size,
            "uploaded": held.uploaded, "total": total, "closing": closing,
            "elapsed": round(elapsed, 3), "rate": round(rate, 1),
            "eta": None if eta is None else round(eta, 1)}


def snapshot(*, mountpoint: str, started: float, core, provider, failures: RecentFailures) -> dict:
    now = time.monotonic()
    creds = provider.current
    report = {
        "mountpoint": mountpoint,
        "pid": os.getpid(),
        "up_seconds": round(time.time() - started, 1),
        "area": f"s3://{creds.bucket}/{creds.prefix}" if creds else None,
        "uploads": [upload_entry(f, now) for f in core.files.in_progress()],
        "kept_back": sorted(f.path for f in core.files.unfinished() if f.state.value == "kept-back"),
        "failed": [{"path": f.path, "error": str(f.error or "")} for f in core.files.unfinished()
                   if f.state.value == "failed"],
        "uploads_completed": core.files.completed,
        "errors_logged": failures.errors,
        "recent_failures": list(failures.entries),
        "credentials": {
            "expires": creds.expiration.isoformat(timespec="seconds") if creds else None,
            "seconds_left": round(creds.seconds_left()) if creds else None,
            "refreshes": provider.refreshes,
            "last_error": str(provider.last_error) if provider.last_error else None,
        },
        "requests": dict(getattr(core.store, "requests", {})),
    }
    cache_stats = getattr(core, "cache_stats", None)
    if callable(cache_stats):
        try:
            report["cache"] = dict(cache_stats())
        except Exception as exc:  # the cache is another module's; status must still answer
            report["cache"] = {"error": repr(exc)}
    return report


def one_line(report: dict) -> str:
    """The systemd STATUS= line: upload counts at a glance."""
    uploads = report["uploads"]
    done = sum(u["uploaded"] for u in uploads)
    text = f"{len(uploads)} uploads in progress, {report['uploads_completed']} done"
    if uploads:
        text += f", {done / 1e6:.1f} MB sent of {sum(u['written'] for u in uploads) / 1e6:.1f} MB written"
    if report["errors_logged"]:
        text += f", {report['errors_logged']} errors (see the log)"
    return text
