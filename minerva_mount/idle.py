"""Work that should only use CPU time nobody else wants: one thread at SCHED_IDLE.

The block cache's writes are such work. A cold read on a desktop with two cores is CPU-bound
(the kernel's FUSE and socket copies, this daemon, the reading program, and with a local S3
server that server too), and writing the fetched blocks to disk at the same priority took
~0.3 s of CPU per GiB away from the read itself (cold dd 496-519 -> 552-577 MB/s at idle
priority on the bench machine, with 93-99% of the blocks still cached). When the writes fall
behind, the cache skips runs instead of holding the read up (reader.Blocks).

Linux lets a thread drop to SCHED_IDLE but not come back without privilege, so the work gets
a thread of its own rather than one of trio's shared workers. The thread ends after `linger`
seconds without work and is started again when work comes. At most `slots` callers wait for
it; a caller cancelled meanwhile (the daemon stopping) frees its slot while its job still runs.
"""

import contextlib
import logging
import os
import queue
import threading

import trio

log = logging.getLogger("minerva.idle")


class IdleWorker:
    def __init__(self, name: str, slots: int = 8, linger: float = 10.0):
        self.name = name
        self.linger = linger
        self._slots = trio.Semaphore(slots)  # bounds the queue: a job waits for a slot first
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    async def run(self, fn, *args):
        """fn(*args) in the idle thread; its result or exception. If the caller is cancelled,
        the job still runs to its end (as with trio.to_thread), its result dropped."""
        async with self._slots:
            token = trio.lowlevel.current_trio_token()
            done = trio.Event()
            outcome: list = []

            def finish(result):
                outcome.append(result)
                done.set()
            with self._lock:
                self._jobs.put((fn, args, token, finish))
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                    self._thread.start()
            await done.wait()
        kind, value = outcome[0]
        if kind == "error":
            raise value
        return value

    def _loop(self) -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except (AttributeError, OSError) as exc:  # not Linux, or refused: run at normal priority
            log.debug("%s: no idle priority (%s)", self.name, exc)
        while True:
            try:
                fn, args, token, finish = self._jobs.get(timeout=self.linger)
            except queue.Empty:
                with self._lock:
                    if self._jobs.empty():
                        self._thread = None
                        return
                continue
            try:
                result = ("value", fn(*args))
            except BaseException as exc:  # handed to the caller, which raises it
                result = ("error", exc)
            with contextlib.suppress(trio.RunFinishedError):  # the daemon stopped: nobody waits
                token.run_sync_soon(finish, result)
