"""Watching the running mount: the control socket, systemd notifications, recent failures.

The daemon creates one Monitor once the file system is up. It starts the control socket
server and a STATUS= updater in the daemon's nursery, and tells systemd READY=1 and
STOPPING=1 at the right moments. Everything it reports comes from report.snapshot.
"""

import time
from pathlib import Path

import trio

from . import control, notify
from .report import RecentFailures, one_line, snapshot

STATUS_INTERVAL = 2.0


class Monitor:
    def __init__(self, mountpoint: str, socket_path: Path, core, provider):
        self.mountpoint = mountpoint
        self.socket_path = socket_path
        self.core = core
        self.provider = provider
        self.started = time.time()
        self.failures = RecentFailures().install()

    def snapshot(self) -> dict:
        return snapshot(mountpoint=self.mountpoint, started=self.started, core=self.core,
                        provider=self.provider, failures=self.failures)

    async def start(self, nursery: trio.Nursery) -> None:
        handlers = {"status": lambda request: {"status": self.snapshot()}}
        await nursery.start(control.serve, self.socket_path, handlers)
        nursery.start_soon(self._status_loop)

    def ready(self) -> None:
        notify.ready(f"mounted at {self.mountpoint}; " + one_line(self.snapshot()))

    def stopping(self) -> None:
        notify.stopping(f"stopping: {len(self.core.files.in_progress())} uploads to finish")

    async def _status_loop(self) -> None:
        last = None
        while True:
            await trio.sleep(STATUS_INTERVAL)
            line = one_line(self.snapshot())
            if line != last:
                notify.status(line)
                last = line

    def close(self) -> None:
        self.failures.remove()
