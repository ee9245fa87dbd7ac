"""A new file written sequentially, streamed to S3 as a multipart upload.

Parts go up in the background while the application keeps writing; at most `max_inflight`
parts per file are in memory, so a fast writer waits instead of filling memory. The object
appears only at `finish` (CompleteMultipartUpload, or one PUT for a file smaller than a
part), so nobody watching the bucket sees a half-written file. A failed upload is left
as it is: the session policy allows no AbortMultipartUpload, and a lifecycle rule on the
service side removes it.
"""

import logging
import time

import trio

from .errors import MinervaError, StoreError
from .store import MTIME_META

log = logging.getLogger("minerva.writer")

MIN_PART = 8 << 20
MAX_PARTS = 10_000


def part_size(number: int) -> int:
    """Size of part `number` (1-based): 8 MiB for the first 1,000, doubling each 1,000 after.

    10,000 parts then reach past 5 TiB while small files keep small parts.
    """
    return MIN_PART << ((number - 1) // 1000)


class NotSequential(MinervaError):
    errno = 95  # EOPNOTSUPP


class Upload:
    def __init__(self, store, path: str, nursery: trio.Nursery, max_inflight: int = 4):
        self.store = store
        self.path = path
        self._nursery = nursery
        self._slots = trio.Semaphore(max_inflight)
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._parts: dict[int, str] = {}
        self._next_part = 1
        self._inflight = 0
        self._idle = trio.Event()
        self._idle.set()
        self._error: MinervaError | None = None
        self.size = 0
        self.mtime: float | None = None
        self.written = False
        self.finished = False
        self.etag: str | None = None
        self.uploaded = 0  # bytes S3 has acknowledged, for status and progress bars
        self.started = time.monotonic()
        self.closing = False  # finish() under way: `size` is now the final total

    @property
    def failed(self) -> bool:
        return self._error is not None

    @property
    def renameable(self) -> bool:
        """Nothing has reached S3 yet, so the object's name can still change."""
        return self._upload_id is None and not self.finished

    @property
    def metadata(self) -> dict[str, str]:
        return {MTIME_META: f"{self.mtime:.9f}"} if self.mtime is not None else {}

    async def write(self, offset: int, data: bytes) -> int:
        if self._error:
            raise self._error
        if self.finished:
            raise StoreError(f"write to {self.path} after it was uploaded and closed")
        if offset != self.size:
            raise NotSequential(
                f"write at {offset} in {self.path}, expected {self.size}: only sequential "
                "writes are supported for new files")
        self._buf += data
        self.size += len(data)
        self.written = True
        while len(self._buf) >= part_size(self._next_part):
            await self._send_part()
        return len(data)

    async def truncate(self, size: int) -> None:
        if size == self.size:
            return
        if self._upload_id is None and size < self.size:
            del self._buf[size:]
            self.size = size
            return
        raise NotSequential(f"truncate of {self.path} to {size} while uploading")

    async def _send_part(self) -> None:
        if self._upload_id is None:
            self._upload_id = await self.store.create_multipart(self.path, self.metadata)
        if self._next_part > MAX_PARTS:
            raise StoreError(f"{self.path} is larger than S3's 10,000-part limit allows")
        size = part_size(self._next_part)
        data, self._buf = bytes(self._buf[:size]), self._buf[size:]
        number = self._next_part
        self._next_part += 1
        await self._slots.acquire()
        self._inflight += 1
        self._idle = trio.Event()
        self._nursery.start_soon(self._upload_part, number, data)

    async def _upload_part(self, number: int, data: bytes) -> None:
        try:
            self._parts[number] = await self.store.upload_part(self.path, self._upload_id, number, data)
            self.uploaded += len(data)
        except MinervaError as exc:
            self._error = self._error or exc
        except Exception as exc:  # a bug must surface as EIO at close, not kill the mount
            log.exception("part %d of %s failed", number, self.path)
            self._error = self._error or StoreError(f"part {number} of {self.path}: {exc!r}")
        finally:
            self._slots.release()
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    async def finish(self) -> str:
        """Send what is left and make the object appear; returns its ETag."""
        if self.finished:
            return self.etag
        if self.mtime is None:
            self.mtime = time.time()
        self.closing = True
        try:
            if self._upload_id is None:
                self.etag = await self.store.put(self.path, bytes(self._buf), self.metadata)
                self.uploaded = self.size
            else:
                if self._buf:
                    await self._send_part()
                await self._idle.wait()
                if self._error:
                    raise self._error
                parts = sorted(self._parts.items())
                self.etag = await self.store.complete_multipart(self.path, self._upload_id, parts)
        except MinervaError as exc:
            log.error("upload of %s failed: %s", self.path, exc)
            self._error = exc
            raise
        self._buf = bytearray()
        self.finished = True
        return self.etag
