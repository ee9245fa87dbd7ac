"""A new file written front to back, streamed to S3 as a multipart upload (multipart.py).

The first part (8 MiB) stays in memory: until it is sent, nothing of the file is in S3, so
the file can still be renamed, or moved to a staging file if a write comes out of order
(`buffered`). A file smaller than one part goes up in one PUT at `finish`.
"""

import logging
import time

import trio

from .errors import MinervaError, NotSequential, StoreError  # noqa: F401 (fileops imports it here)
from .multipart import MultipartSender, part_size
from .store import MTIME_META

log = logging.getLogger("minerva.writer")


class Upload:
    def __init__(self, store, path: str, nursery: trio.Nursery):
        self.store = store
        self.path = path
        self._nursery = nursery
        self._buf = bytearray()
        self._sender: MultipartSender | None = None
        self.size = 0
        # The time of the last write, as a local disk keeps it, unless utimens sets one: shown
        # while the file is written and stored with the object, so `stat` gives one mtime per
        # content (vim refuses to save a file whose mtime changed since it read it).
        self.mtime: float = time.time()
        self.started = time.monotonic()
        self.closing = False  # finish() under way: `size` is now the final total

    @property
    def uploaded(self) -> int:
        """Bytes S3 has acknowledged, for status and progress bars."""
        return self._sender.uploaded if self._sender else 0

    @property
    def renameable(self) -> bool:
        """Nothing has reached S3 yet, so the object's name can still change."""
        return self._sender is None

    @property
    def metadata(self) -> dict[str, str]:
        return {MTIME_META: f"{self.mtime:.9f}"} if self.mtime is not None else {}

    def buffered(self) -> bytes:
        """Everything written so far, while no part has been sent (`renameable`)."""
        return bytes(self._buf)

    async def write(self, offset: int, data: bytes) -> int:
        if self._sender is not None and self._sender.error:
            raise self._sender.error
        if self.closing:
            raise StoreError(f"write to {self.path} after it was closed")
        if offset != self.size:
            raise NotSequential(
                f"write at {offset} in {self.path}, expected {self.size}: only sequential "
                "writes are supported for new files")
        self._buf += data
        self.size += len(data)
        self.mtime = time.time()
        try:
            while len(self._buf) >= part_size(self._next_number()):
                await self._send_part()
        except MinervaError:
            if self._sender is not None and not self._sender.started:
                # Refused before anything was sent (CreateMultipartUpload failed): the write
                # changes nothing, so a close after it does not publish bytes the program
                # was told were not written.
                del self._buf[len(self._buf) - len(data):]
                self.size -= len(data)
                self._sender = None
            raise
        return len(data)

    def _next_number(self) -> int:
        return self._sender.next_part if self._sender else 1

    async def truncate(self, size: int) -> None:
        if size == self.size:
            return
        if self._sender is None and size < self.size:
            del self._buf[size:]
            self.size = size
            return
        raise NotSequential(f"truncate of {self.path} to {size} while uploading")

    async def _send_part(self) -> None:
        if self._sender is None:
            self._sender = MultipartSender(self.store, self.path, self._nursery)
        if not self._sender.started:
            await self._sender.start(self.metadata)  # before the buffer is touched
        size = part_size(self._sender.next_part)
        if len(self._buf) == size:  # the usual case (writes of 1 MiB): hand the buffer over
            data, self._buf = self._buf, bytearray()
        else:
            data = self._buf[:size]
            del self._buf[:size]
        await self._sender.send(data, self.metadata)

    async def finish(self) -> str:
        """Send what is left and make the object appear; returns its ETag."""
        self.closing = True
        if self._sender is None:
            etag = await self.store.put(self.path, bytes(self._buf), self.metadata)
        else:
            if self._buf:
                await self._send_part()
            etag = await self._sender.complete()
        self._buf = bytearray()
        return etag
