"""Support for the write-back model test (test_core_model_writeback.py) and its regressions.

- `Daemon`: Core with a WriteBack over a spool folder, started as daemon.py starts it
  (`nursery.start(writeback.run, core.files, core.restore_spooled)`), and `crash`ed: every
  task of it cancelled without draining and every descriptor it held closed (as the kernel
  closes a killed process's), leaving the staging and spool folders as they are; `start`
  again makes a new Core and WriteBack over the same store and folders.
- `drain_spool`: wait until every spooled file is uploaded (or failed for good), moving the
  (Mock)clock on to the next retry whenever everything waits: a deadline in trio time, no
  sleep. `drained` is the condition.
- `inline_threads`: trio.to_thread.run_sync runs the function in the loop's thread, so
  "every task is blocked" (trio.testing.wait_all_tasks_blocked) also means no spool write or
  part read is under way in a thread: each step sees the same interleaving every run, and
  a frozen MockClock is never jumped while a thread works.
- `seed_scheduler`: trio's scheduler is deterministic under Hypothesis (trio registers its
  scheduling Random with it), but the order within a step then depends on every step before
  it; seeded at each step, it depends on that step alone, so unrelated steps shrink away.
- `example_folder`: a private folder per example on tmpfs when there is one (a close fsyncs
  twice or more: on tmpfs that is free), holding `staging/` and `spool/` (one file system,
  so the spool links staging files as the daemon does).
"""

import contextlib
import math
import os
import shutil
import tempfile

import trio
import trio.testing
from model_support import FillingDisk

from minerva_mount.core import Core
from minerva_mount.localfiles import State
from minerva_mount.writeback import Spool, WriteBack

SPOOL_CAP = 1 << 30  # bytes: never reached by the model's files (a full spool is its own test)
DRAIN_LIMIT = 3600.0  # trio seconds drain_spool may take (retries back off to 60 s)
LISTING_TTL = 1e9  # the model says when listings expire (ttl_passes), not the clock


def example_folder() -> str:
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    folder = tempfile.mkdtemp(prefix="minerva-wb-", dir=base)
    for name in ("staging", "spool"):
        os.mkdir(os.path.join(folder, name), 0o700)
    return folder


def remove_folder(folder: str) -> None:
    close_descriptors_under(folder)
    shutil.rmtree(folder, ignore_errors=True)


def close_descriptors_under(folder: str) -> None:
    """Close every descriptor of this process open on `folder` or a file in it (staging
    files have no name: /proc shows `FOLDER/#INODE (deleted)`)."""
    prefix = folder.rstrip("/") + "/"
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{name}")
            if target == folder.rstrip("/") or target.startswith(prefix):
                os.close(int(name))


async def _inline_run_sync(fn, *args, thread_name=None, abandon_on_cancel=False, cancellable=None,
                           limiter=None):
    await trio.lowlevel.checkpoint()
    return fn(*args)


@contextlib.contextmanager
def inline_threads():
    saved = trio.to_thread.run_sync
    trio.to_thread.run_sync = _inline_run_sync
    try:
        yield
    finally:
        trio.to_thread.run_sync = saved


def seed_scheduler(seed: int) -> None:
    """Seed the Random trio's scheduler shuffles runnable tasks with (trio._core._run._r:
    private, the one trio gives Hypothesis to manage with register_random)."""
    from trio._core import _run

    _run._r.seed(seed)


def drained(core) -> bool:
    """Every file whose close returned is in S3, or failed for good (FAILED, kept in the
    spool), or open for writing again: its last closed version stays in the spool for a crash
    to send until its next close makes a newer one durable (LocalFiles.before_change). Not
    `files.idle` (unset while a file is open with changes) nor `files.spooled()` (a file
    being uploaded is PUBLISHING, not SPOOLED)."""
    return all(f.spooled is None or f.state is State.FAILED
               or (f.state is State.STAGED and f.writers > 0) for f in core.files)


async def drain_spool(core, limit: float = DRAIN_LIMIT) -> None:
    """Wait (in trio time, on a MockClock) until `drained(core)`; the background uploads
    retry with backoff, so whenever every task waits the clock moves to the next deadline."""
    clock = trio.lowlevel.current_clock()
    end = trio.current_time() + limit
    while True:
        await trio.testing.wait_all_tasks_blocked()
        if drained(core):
            return
        wait = trio.lowlevel.current_statistics().seconds_to_next_deadline
        if math.isinf(wait) or trio.current_time() + wait > end:
            left = [(f.path, f.state.value) for f in core.files if f.spooled is not None]
            raise AssertionError(f"the spool did not drain within {limit:g} s (trio time): {left}")
        clock.jump(max(wait, 1e-6))


class Daemon:
    """Core + WriteBack over `store` and `folder`, as daemon.py makes them; restartable."""

    def __init__(self, store, folder: str, still_open, cap: int = SPOOL_CAP):
        self.store, self.folder, self.still_open, self.cap = store, folder, still_open, cap
        self.core = self.disk = self.writeback = None
        self._nursery: trio.Nursery | None = None
        self._scope: trio.CancelScope | None = None
        self._done: trio.Event | None = None

    def _open(self, name: str) -> int:
        return os.open(os.path.join(self.folder, name), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)

    async def start(self, nursery: trio.Nursery | None = None) -> Core:
        self._nursery = nursery or self._nursery
        self.core = await self._nursery.start(self._serve)
        return self.core

    async def _serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._done = trio.Event()
        try:
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    self.disk = FillingDisk(self._open("staging"))
                    self.writeback = WriteBack(Spool(self._open("spool"), self.cap))
                    core = Core(self.store, nursery, listing_ttl=LISTING_TTL, still_open=self.still_open,
                                staging=self.disk, writeback=self.writeback)
                    await nursery.start(self.writeback.run, core.files, core.restore_spooled)
                    task_status.started(core)
                    await trio.sleep_forever()
        finally:
            self._done.set()

    async def crash(self) -> None:
        """SIGKILL: nothing drains, nothing more is written; the folders stay as they are."""
        self._scope.cancel()
        await self._done.wait()
        close_descriptors_under(self.folder)

    async def restart(self) -> Core:
        await self.crash()
        return await self.start()
