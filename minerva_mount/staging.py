"""Local staging files: every write that is not a new file streamed front to back.

Overwriting part of a file, appending, truncating, opening a file read-write, random writes,
and files with temporary names all go through one local file per path, shared by every open
handle on that path (so two handles see each other's writes). The file starts empty or as
a lazy copy of the object: a block is fetched with one ranged GET the first time it is read
or partly overwritten, never before. At close the whole file goes up as ONE new object (a
PUT, or a multipart upload read back from the file), so nobody watching the bucket sees a
half-changed object.

Staging files are created in a 0700 folder and unlinked at once (only the open descriptor
keeps them), so their disk space is released when the upload is done and the file is
closed, and even when the daemon dies.

Temporary names (see `is_temporary`) stay here at close: they reach S3 only when renamed
to a final name, and never if deleted.
"""

import errno
import logging
import os
import re
import tempfile
import time

import trio

from .errors import MinervaError, StoreError
from .store import MTIME_META, ObjectInfo
from .writer import MAX_INFLIGHT, MAX_PARTS, MIN_PART, part_size

log = logging.getLogger("minerva.staging")

BLOCK = 1 << 20  # unit of the lazy fill from the object
FETCH = 16 << 20  # most bytes one GET brings in while filling everything before an upload

# Names programs give a file while they write it, before renaming it (or deleting it).
TEMPORARY_NAMES = [
    (re.compile(r".+\.part"), "KDE/KIO and browsers: name.part, renamed when complete"),
    (re.compile(r"\.goutputstream-[A-Za-z0-9]{6}"), "GIO (GNOME Files, gedit): replaced by a rename"),
    (re.compile(r"\..+\.sw[a-p]"), "vim swap files (.name.swp), deleted when the editor ends"),
    (re.compile(r".+~"), "editor backups (name~), written before saving and usually deleted"),
    # mkstemp's six characters; all-lowercase ones are taken as a real extension (.notes.backup),
    # which a random suffix is with odds of 1 in 180.
    (re.compile(r"\..+\.(?=[a-z]*[A-Z0-9])[A-Za-z0-9]{6}"), "rsync's .name.XXXXXX, renamed when complete"),
    (re.compile(r"\.~lock\..+#"), "LibreOffice lock files (.~lock.name#), deleted when closed"),
    (re.compile(r"~\$.+"), "Microsoft Office owner files (~$name), deleted when closed"),
]


def is_temporary(path: str) -> bool:
    """Whether the file name is one programs use while writing, before a rename or delete."""
    name = path.rsplit("/", 1)[-1]
    return any(pattern.fullmatch(name) for pattern, _ in TEMPORARY_NAMES)


def default_staging_dir() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(cache, "minerva-mount", "staging")


class Staged:
    """One file's content on local disk: `base` is the object it started from (or None)."""

    def __init__(self, store, path: str, folder: str, base: ObjectInfo | None = None,
                 max_inflight: int = MAX_INFLIGHT):
        self.store = store
        self.path = path
        self.base = base
        self.size = base.size if base else 0
        self.mtime: float | None = None
        self.dirty = base is None  # to be sent at the last writer's close (a new file: even empty)
        self.written = False  # changed since opened or sent: a close() sends it
        self.opens = 0
        self.writers = 0
        self.uploading = False
        self.failed = False
        self._base_end = self.size  # bytes [0, _base_end) not yet filled come from `base`
        self._filled = bytearray((self.size + BLOCK - 1) // BLOCK)
        self._lock = trio.Lock()  # one fill or upload at a time
        self._max_inflight = max_inflight
        os.makedirs(folder, mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)
        fd, name = tempfile.mkstemp(dir=folder, prefix="staged-")  # mode 0600
        os.unlink(name)
        self._fd = fd
        os.ftruncate(fd, self.size)

    @property
    def temporary(self) -> bool:
        return is_temporary(self.path)

    @property
    def metadata(self) -> dict[str, str]:
        return {MTIME_META: f"{self.mtime:.9f}"} if self.mtime is not None else {}

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
            os.pwrite(self._fd, data, lo)
            for b in range(block, run):
                self._filled[b] = 1
            block = run

    async def fill_all(self) -> None:
        async with self._lock:
            await self._fill(0, self.size)
        self.base = None

    # ----- file operations ---------------------------------------------------------------

    async def read(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        async with self._lock:
            await self._fill(offset, end)
        return os.pread(self._fd, end - offset, offset)

    async def write(self, offset: int, data: bytes) -> int:
        if self.uploading:
            raise MinervaError(f"{self.path} is being uploaded; write again once close returns",
                               err=errno.EBUSY)
        end = offset + len(data)
        async with self._lock:
            # Only blocks partly overwritten need the object's bytes around the new data.
            for edge in (offset, end):
                if edge % BLOCK:
                    head = edge - edge % BLOCK
                    await self._fill(head, head + 1)  # the whole block around the edge
            os.pwrite(self._fd, data, offset)
        for block in range(offset // BLOCK, min((end + BLOCK - 1) // BLOCK, len(self._filled))):
            self._filled[block] = 1
        self.size = max(self.size, end)
        self.dirty = self.written = True
        return len(data)

    async def truncate(self, size: int) -> None:
        """Shrink or grow; bytes past the new end are gone, a later growth reads as zeros."""
        if size == self.size:
            return
        async with self._lock:
            self._base_end = min(self._base_end, size)
            os.ftruncate(self._fd, size)
        self.size = size
        self.dirty = self.written = True

    # ----- upload -----------------------------------------------------------------------

    async def upload(self) -> str:
        """Send the whole content as one new object under `self.path`; returns its ETag."""
        if self.mtime is None:
            self.mtime = time.time()
        async with self._lock:
            self.uploading = True
            try:
                await self._fill(0, self.size)
                if self.size < MIN_PART:
                    data = os.pread(self._fd, self.size, 0)
                    etag = await self.store.put(self.path, data, self.metadata)
                else:
                    etag = await self._multipart()
            finally:
                self.uploading = False
        self.dirty = self.written = False
        self.base = ObjectInfo(self.path, self.size, self.mtime, etag)
        self._base_end = self.size
        self._filled = bytearray(b"\1" * ((self.size + BLOCK - 1) // BLOCK))
        return etag

    async def _multipart(self) -> str:
        path = self.path
        upload_id = await self.store.create_multipart(path, self.metadata)
        parts: dict[int, str] = {}
        errors: list[MinervaError] = []
        slots = trio.CapacityLimiter(self._max_inflight)

        async def send(number: int, offset: int, size: int) -> None:
            try:
                async with slots:  # at most this many parts in memory
                    data = await trio.to_thread.run_sync(os.pread, self._fd, size, offset)
                    parts[number] = await self.store.upload_part(path, upload_id, number, data)
            except MinervaError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            offset, number = 0, 1
            while offset < self.size:
                if number > MAX_PARTS:
                    raise StoreError(f"{path} is larger than S3's 10,000-part limit allows")
                size = min(part_size(number), self.size - offset)
                if errors:
                    break
                nursery.start_soon(send, number, offset, size)
                offset, number = offset + size, number + 1
        if errors:
            # No AbortMultipartUpload (the session policy refuses it): the lifecycle rule cleans.
            raise errors[0]
        return await self.store.complete_multipart(path, upload_id, sorted(parts.items()))
