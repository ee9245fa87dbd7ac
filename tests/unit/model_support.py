"""Support for the model test of Core (test_core_model.py) and its regressions.

- `ModelStore`: the in-memory FakeStore whose requests fail on demand (per request kind,
  once or until healed), every injected failure logged with the keys it hit, and whose
  requests of one kind can be held at a gate (a flush in flight while a rename runs).
- `TrioThread`: one trio loop per example, in a thread, with a nursery for Core's
  background tasks, so Hypothesis's synchronous rules can await Core calls one at a time.
- `small_parts`: a fixture that makes the multipart part size and the staging block tiny,
  so files of a few bytes go through multipart uploads and lazy block fills.

The model tests run derandomized by default (the same 2,000 programs each run), so CI tells
a change from luck; exploring is a separate, long run with fresh programs:
`MODEL_RANDOM=1 MODEL_EXAMPLES=20000 pytest tests/unit/test_core_model*.py -x`. What such a
run finds is pinned in test_core_regressions.py.
"""

import contextlib
import errno
import inspect
import logging
import os
import sys
import threading

import pytest
import trio

from minerva_mount.errors import AccessDenied, MinervaError, StoreError
from minerva_mount.fakestore import FakeStore

# Request kinds FakeStore counts (FakeStore._enter); "list" covers list_dir, list_tree and
# has_children, "get" get_range and get_blocks.
KINDS = ("list", "head", "get", "put", "create_multipart", "upload_part",
         "complete_multipart", "copy", "delete")

PART = 16  # bytes: part size and staging block while `small_parts` is active


class ModelStore(FakeStore):
    """FakeStore with failure injection keyed by request kind.

    `failing`: kinds whose every request fails until `heal()`. `fail_once`: kinds whose next
    request fails. `fired` lists (kind, keys) of every injected failure, so the model can
    tell which operation (or which file's background upload) saw one. `suspended` turns
    injection off (the model's own observations). `gates[kind]`: requests of that kind
    wait at the gate until the event is set; `arrived[kind]` is set when one reaches it.
    `denied`: kinds whose requests for a file's key (not a folder marker) fail with
    AccessDenied until `heal()`, logged in `fired` as "KIND denied".
    """

    def __init__(self):
        super().__init__()
        self.failing: set[str] = set()
        self.fail_once: set[str] = set()
        self.denied: set[str] = set()
        self.fired: list[tuple[str, tuple[str, ...]]] = []
        self.suspended = False
        self.gates: dict[str, trio.Event] = {}
        self.arrived: dict[str, trio.Event] = {}
        self.writes: list[tuple[str, str]] = []  # (kind, key) of every request that makes an object

    def heal(self) -> None:
        self.failing.clear()
        self.fail_once.clear()
        self.denied.clear()

    async def _enter(self, kind: str) -> None:
        # The key the request is for: FakeStore's methods name it `path` (`src`, `dst` for copy).
        args = sys._getframe(1).f_locals
        keys = tuple(args[name] for name in ("path", "src", "dst") if isinstance(args.get(name), str))
        self.requests[kind] += 1
        gate = self.gates.get(kind)
        if gate is not None and not self.suspended:
            self.arrived.setdefault(kind, trio.Event()).set()
            await gate.wait()
        await trio.sleep(0)
        if not self.suspended and (kind in self.failing or kind in self.fail_once):
            self.fail_once.discard(kind)
            self.fired.append((kind, keys))
            raise StoreError(f"{kind} {' '.join(keys)}: injected failure")
        if not self.suspended and kind in self.denied and keys and not keys[-1].endswith("/"):
            self.fired.append((f"{kind} denied", keys))
            raise AccessDenied(f"{kind} {' '.join(keys)}: injected AccessDenied")
        if kind in ("put", "complete_multipart", "copy"):
            self.writes.append((kind, keys[-1]))

    def content(self, key: str) -> bytes | None:
        found = self.objects.get(key)
        return None if found is None else found[0]


try:
    from minerva_mount.staging import StagingArea
except ImportError:  # before the rewrite: Core takes staging_dir, no hook for a full disk
    StagingArea = None

if StagingArea is not None:
    class FillingDisk(StagingArea):
        """A staging disk that fills on demand (notes case 1).

        `mode`: None (room), "enospc" (every write, and every growth of a file, fails with
        ENOSPC and writes nothing), or "short" (every write writes at most half of what it
        is given, at least one byte, and says so: never an error, the caller must loop).
        `refusals` counts the ENOSPC answers, so the model can tell a step saw one.
        """

        def __init__(self, folder_fd: int):
            super().__init__(folder_fd)
            self.mode: str | None = None
            self.refusals = 0
            self._made: list[tuple[int, int]] = []  # (fd, inode) of every staging file

        def new_file(self) -> int:
            fd = super().new_file()
            self._made.append((fd, os.fstat(fd).st_ino))
            return fd

        def close(self) -> None:
            """After the example: close the staging files Core still holds (kept-back files
            live until the daemon ends) and the folder, so thousands of examples do not run
            out of descriptors."""
            for fd, ino in self._made:
                with contextlib.suppress(OSError):
                    st = os.fstat(fd)
                    if st.st_ino == ino and st.st_nlink == 0:
                        os.close(fd)
            self._made.clear()
            with contextlib.suppress(OSError):
                os.close(self.folder_fd)

        def pwrite(self, fd: int, data, offset: int) -> int:
            if self.mode == "enospc" and len(data):
                self.refusals += 1
                raise OSError(errno.ENOSPC, "No space left on device (model)")
            if self.mode == "short" and len(data) > 1:
                data = memoryview(data)[:len(data) // 2]
            return super().pwrite(fd, data, offset)

        def ftruncate(self, fd: int, size: int) -> None:
            if self.mode == "enospc" and size > os.fstat(fd).st_size:
                self.refusals += 1
                raise OSError(errno.ENOSPC, "No space left on device (model)")
            super().ftruncate(fd, size)
else:
    FillingDisk = None


def make_core(store, nursery, staging_dir: str, still_open, **kwargs):
    """Core as the model and the regressions drive it, whichever staging API Core has.

    Returns (core, disk): disk is a FillingDisk when Core takes a StagingArea, else None.
    """
    from minerva_mount.core import Core

    params = inspect.signature(Core.__init__).parameters
    disk = None
    if "staging" in params and FillingDisk is not None:
        os.makedirs(staging_dir, mode=0o700, exist_ok=True)
        disk = FillingDisk(os.open(staging_dir, os.O_RDONLY | os.O_DIRECTORY))
        kwargs["staging"] = disk
    else:
        kwargs["staging_dir"] = staging_dir
    return Core(store, nursery, listing_ttl=3600.0, still_open=still_open, **kwargs), disk


class TrioThread:
    """A trio loop in a thread for one example: `run(afn, *args)` awaits afn in it.

    `setup(nursery)` is called in the loop before anything runs (it makes the Core; if it
    returns an awaitable, that is awaited). An exception that ends the loop (a background
    task of Core crashing) is raised by the next `run` and by `close`.
    """

    def __init__(self, setup, clock=None):
        self._clock = clock
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: trio.Event | None = None
        self.token = None
        self.value = None
        self._thread = threading.Thread(target=self._thread_main, args=(setup,), daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _thread_main(self, setup) -> None:
        try:
            trio.run(self._main, setup, clock=self._clock)
        except BaseException as exc:  # noqa: BLE001 (re-raised in the caller's thread)
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self, setup) -> None:
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self.token = trio.lowlevel.current_trio_token()
            value = setup(nursery)
            self.value = await value if inspect.isawaitable(value) else value
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def run(self, afn, *args):
        try:
            return trio.from_thread.run(afn, *args, trio_token=self.token)
        except trio.RunFinishedError:
            self._thread.join()
            if self._error is not None:
                raise self._error from None
            raise

    def close(self) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
        self._thread.join()
        if self._error is not None:
            raise self._error


def set_small_parts(monkeypatch, size: int = PART) -> None:
    """Part size and staging block of `size` bytes, wherever the code keeps them.

    TODO(lead): a Core(part_size=..., staging_block=...) knob would replace this patching
    of module constants (MIN_PART lives in writer.py today, multipart.py in the rewrite).
    """
    import importlib

    for name in ("writer", "multipart", "staging", "localfiles", "handles"):
        try:
            module = importlib.import_module(f"minerva_mount.{name}")
        except ImportError:
            continue
        if hasattr(module, "MIN_PART"):
            monkeypatch.setattr(module, "MIN_PART", size)
        if name == "staging" and hasattr(module, "BLOCK"):
            monkeypatch.setattr(module, "BLOCK", size)


@pytest.fixture
def small_parts(monkeypatch):
    set_small_parts(monkeypatch)


@contextlib.contextmanager
def quiet_logs():
    """Core logs every refusal and failure; thousands of examples make that noise and time."""
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def errno_of(exc: BaseException) -> int:
    return exc.errno if isinstance(exc, MinervaError) else errno.EIO


def ttl_passes(core) -> None:
    """Every listing Core cached is older than its TTL: changes made outside become visible.

    TODO(lead): the one use of a Core internal here; a public hook (or a clock passed to
    Core) would do.
    """
    core.listings.clear()
