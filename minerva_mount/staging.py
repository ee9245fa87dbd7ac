"""Local staging files: the content of every change that is not a new file streamed front to back.

Overwriting part of a file, appending, truncating, opening a file read-write, random writes,
and files with temporary names all go through one local file per held file (localfiles.py),
shared by every handle open on it. The file starts empty or as a lazy copy of the object: a
block is fetched with one ranged GET (pinned to the ETag) the first time it is read or partly
overwritten, never before. `upload` sends the whole content as ONE new object (a PUT, or a
multipart upload read back from the file), so nobody watching the bucket sees a half-changed
object. What state the file is in (open, kept back, publishing) is not this module's
business: localfiles.py owns that.

The files live in the staging folder, opened once as a folder descriptor that was checked to
be ours (safepaths.py), and are made with O_TMPFILE: they never have a name another user could
replace, and their space is released when the last descriptor closes, even after a crash.

Every write checks its count: a full disk (ENOSPC, or a short write) fails the application's
write with ENOSPC (`NoSpace`) and never leaves a hole that would be sent as zeros.
"""

import errno
import logging
import os
import tempfile

import trio

from .errors import MinervaError, NoSpace, StoreError, TooBig
from .multipart import MAX_PARTS, MIN_PART, MultipartSender, part_size
from .store import MTIME_META, ObjectInfo

log = logging.getLogger("minerva.staging")

BLOCK = 1 << 20  # unit of the lazy fill from the object
FETCH = 16 << 20  # most bytes one GET brings in while filling everything before an upload
MAX_SIZE = 5 << 40  # S3's largest object


class _Skipped:
    """Stands for a part an earlier run sent (write-back resume): only its length is used."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


SPARES = 8  # empty staging files kept ready (StagingArea.keep_spares)


class StagingArea:
    """The staging folder: makes staging files, and is the one place that writes to them.

    Subclassed by the model tests to simulate a disk that fills (short writes, ENOSPC).
    """

    def __init__(self, folder_fd: int):
        self.folder_fd = folder_fd
        self._spares: list[int] = []  # empty staging files made ahead (keep_spares)
        self._taken = trio.Event()  # a create came: make spares up to SPARES again

    @classmethod
    def private_temporary(cls) -> "StagingArea":
        """A fresh 0700 folder of our own under the system's temporary folder (tests)."""
        folder = tempfile.mkdtemp(prefix="minerva-staging-")
        return cls(os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW))

    def new_file(self) -> int:
        """A file with no name, 0600, in the staging folder: a spare if there is one."""
        self._taken.set()  # (also when none is ready: after a full disk, make them again, WB19)
        if self._spares:
            return self._spares.pop()
        return self._make_file()

    async def keep_spares(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Keep SPARES empty staging files ready (a task of the daemon's nursery).

        Making one on the event loop cost each create 0.11 ms during a write-back copy, a
        third of the create's time: an unnamed file joins the file system's orphan list, a
        journal update that waits while the previous close's fsync commits. Here it waits in
        a thread, between creates. After a failure (a full disk) none is made until the next
        create, which then makes its own file (and meets the error itself if there is one).
        """
        task_status.started()
        try:
            while True:
                self._taken = trio.Event()
                try:
                    while len(self._spares) < SPARES:
                        self._spares.append(await trio.to_thread.run_sync(self._make_file))
                except OSError as exc:
                    log.warning("could not make a spare staging file: %s", exc.strerror)
                await self._taken.wait()
        finally:
            while self._spares:
                os.close(self._spares.pop())

    def _make_file(self) -> int:
        try:
            return os.open(".", os.O_TMPFILE | os.O_RDWR, 0o600, dir_fd=self.folder_fd)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
        # No O_TMPFILE on this file system: a random name, created exclusively, unlinked at once.
        name = f"staged-{os.urandom(8).hex()}"
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=self.folder_fd)
        os.unlink(name, dir_fd=self.folder_fd)
        return fd

    def pwrite(self, fd: int, data, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def ftruncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def write_all(self, fd: int, data, offset: int, path: str) -> None:
        """Write every byte or raise NoSpace: a short write is never taken as complete."""
        view = memoryview(data)
        while view:
            try:
                written = self.pwrite(fd, view, offset)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    log.error("write to %s refused: the staging disk is full (ENOSPC)", path)
                    raise NoSpace(f"{path}: the staging disk is full") from None
                raise MinervaError(f"{path}: staging write failed: {exc.strerror}") from None
            if written <= 0:
                log.error("write to %s refused: the staging disk is full (short write)", path)
                raise NoSpace(f"{path}: the staging disk is full (short write)")
            view, offset = view[written:], offset + written

    def resize(self, fd: int, size: int, path: str) -> None:
        try:
            self.ftruncate(fd, size)
        except OSError as exc:
            if exc.errno == errno.EFBIG:
                log.warning("refused size %d for %s: more than the staging disk takes (EFBIG)", size, path)
                raise TooBig(f"{path}: {size} bytes is more than the staging disk takes") from None
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                log.error("truncate of %s refused: the staging disk is full (ENOSPC)", path)
                raise NoSpace(f"{path}: the staging disk is full") from None
            raise MinervaError(f"{path}: staging truncate failed: {exc.strerror}") from None


def copy_all(source: int, target: int, size: int) -> None:
    """Bytes [0, size) of `source` into `target` (a reflink where the file system has them)."""
    offset = 0
    while offset < size:
        sent = os.copy_file_range(source, target, size - offset, offset, offset)
        if sent <= 0:
            raise OSError(errno.EIO, "short copy")
        offset += sent


def check_size(path: str, size: int) -> None:
    if size > MAX_SIZE:
        log.warning("refused size %d for %s: more than S3's 5 TiB limit (EFBIG)", size, path)
        raise TooBig(f"{path}: {size} bytes is more than S3's 5 TiB limit")


class Staged:
    """One file's content on local disk: `base` is the object it started from (or None)."""

    def __init__(self, store, area: StagingArea, path: str, base: ObjectInfo | None = None):
        self.store = store
        self.area = area
        self.path = path  # for messages; the key it is sent to is given to `upload`
        self.base = base
        self.size = base.size if base else 0
        self.mtime: float | None = None
        self.sender: MultipartSender | None = None  # while an upload is under way, for progress
        self._base_end = self.size  # bytes [0, _base_end) not yet filled come from `base`
        self._filled = bytearray((self.size + BLOCK - 1) // BLOCK)
        self._lock = trio.Lock()  # one fill or upload at a time
        self._fd = area.new_file()
        try:
            area.resize(self._fd, self.size, path)
        except MinervaError:
            self.close()
            raise

    @classmethod
    def restored(cls, store, area: StagingArea, path: str, fd: int, size: int, mtime: float) -> "Staged":
        """A file of the write-back spool, found at start: its content is all local."""
        staged = cls.__new__(cls)
        staged.store, staged.area, staged.path, staged.base = store, area, path, None
        staged.size, staged.mtime, staged.sender = size, mtime, None
        staged._base_end, staged._filled = 0, bytearray()
        staged._lock, staged._fd = trio.Lock(), fd
        return staged

    @property
    def fd(self) -> int:
        """The descriptor of the content (the write-back spool links it into its folder)."""
        return self._fd

    @property
    def metadata(self) -> dict[str, str]:
        return {MTIME_META: f"{self.mtime:.9f}"} if self.mtime is not None else {}

    @property
    def uploaded(self) -> int:
        return self.sender.uploaded if self.sender else 0

    async def fork(self) -> None:
        """Go on in a copy of the content: the write-back spool keeps this file, the last
        closed version, until the next close makes a newer one durable (writeback.py)."""
        async with self._lock:
            fd = self.area.new_file()
            try:
                await trio.to_thread.run_sync(copy_all, self._fd, fd, self.size)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    log.error("copy of %s refused: the staging disk is full (ENOSPC)", self.path)
                    raise NoSpace(f"{self.path}: the staging disk is full") from None
                raise MinervaError(f"{self.path}: staging copy failed: {exc.strerror}") from None
            os.close(self._fd)
            self._fd = fd

    def close(self) -> None:
        """Give the disk space back."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # ----- lazy fill from the object ----------------------------------------------------

    async def _fill(self, start: int, end: int) -> None:
        """Make bytes [start, end) local: fetch the blocks of the object not fetched yet."""
        end = min(end, self._base_end)
        if self.base is None or start >= end:
            return
        first, last = start // BLOCK, (end - 1) // BLOCK
        block = first
        while block <= last:
            if self._filled[block]:
                block += 1
                continue
            run = block
            while run <= last and not self._filled[run] and (run - block + 1) * BLOCK <= FETCH:
                run += 1
            lo, hi = block * BLOCK, min(run * BLOCK, self._base_end)
            data = await self.store.get_range(self.base.path, lo, hi, self.base.etag)
            if len(data) != hi - lo:
                raise StoreError(f"{self.base.path}: short read while staging ({len(data)} of {hi - lo})")
            self.area.write_all(self._fd, data, lo, self.path)
            for b in range(block, run):
                self._filled[b] = 1
            block = run

    async def fill_all(self) -> None:
        """Bring every byte local, so the object it started from may go."""
        async with self._lock:
            await self._fill(0, self.size)
        self.base = None

    async def reset(self, base: ObjectInfo) -> None:
        """Back to `base`'s content, read from it again as it is used: undoes a refused
        change of a file S3 holds as it is (a shrink too, which no local undo could)."""
        async with self._lock:
            self.area.resize(self._fd, 0, self.path)
            self.area.resize(self._fd, base.size, self.path)
            self.base, self.size, self._base_end = base, base.size, base.size
            self._filled = bytearray((base.size + BLOCK - 1) // BLOCK)

    def rebase(self, base: ObjectInfo) -> None:
        """The object it started from was copied to a new name (a rename): fill from there."""
        self.base = base

    # ----- file operations ---------------------------------------------------------------

    async def read(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        async with self._lock:
            await self._fill(offset, end)
            return os.pread(self._fd, end - offset, offset)

    async def write(self, offset: int, data: bytes) -> int:
        end = offset + len(data)
        check_size(self.path, end)
        async with self._lock:
            # Only blocks partly overwritten need the object's bytes around the new data.
            for edge in (offset, end):
                if edge % BLOCK:
                    head = edge - edge % BLOCK
                    await self._fill(head, head + 1)  # the whole block around the edge
            self.area.write_all(self._fd, data, offset, self.path)
            for block in range(offset // BLOCK, min((end + BLOCK - 1) // BLOCK, len(self._filled))):
                self._filled[block] = 1
            self.size = max(self.size, end)
        return len(data)

    async def truncate(self, size: int) -> None:
        """Shrink or grow; bytes past the new end are gone, a later growth reads as zeros."""
        check_size(self.path, size)
        if size == self.size:
            return
        async with self._lock:
            self.area.resize(self._fd, size, self.path)
            self._base_end = min(self._base_end, size)
            self.size = size

    # ----- upload -----------------------------------------------------------------------

    async def upload(self, key: str, nursery: trio.Nursery, journal=None) -> str:
        """Send the whole content as one new object under `key`; returns its ETag.

        `journal` (write-back): resume the multipart upload it records, and record progress."""
        async with self._lock:
            await self._fill(0, self.size)
            if self.size < MIN_PART:
                data = os.pread(self._fd, self.size, 0)
                etag = await self.store.put(key, data, self.metadata)
            else:
                etag = await self._multipart(key, nursery, journal)
        self.base = ObjectInfo(key, self.size, self.mtime or 0.0, etag)
        self._base_end = self.size
        self._filled = bytearray(b"\1" * ((self.size + BLOCK - 1) // BLOCK))
        return etag

    async def _multipart(self, key: str, nursery: trio.Nursery, journal=None) -> str:
        self.sender = sender = MultipartSender(self.store, key, nursery, journal=journal)
        try:
            offset = 0
            while offset < self.size:
                if sender.next_part > MAX_PARTS:
                    raise StoreError(f"{key} is larger than S3's 10,000-part limit allows")
                size = min(part_size(sender.next_part), self.size - offset)
                if sender.has(sender.next_part):
                    data = _Skipped(size)
                else:
                    data = await trio.to_thread.run_sync(os.pread, self._fd, size, offset)
                await sender.send(data, self.metadata)  # waits while 8 parts are on the wire
                offset += size
            return await sender.complete()
        finally:
            self.sender = None
