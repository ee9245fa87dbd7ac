"""One multipart sender, shared by streamed uploads (writer.py) and staged files (staging.py).

Parts go up in the background under the caller's nursery, at most `max_inflight` at a time
(each holds its bytes in memory until S3 acknowledges it), so a fast producer waits instead
of filling memory. The object appears only at `complete` (CompleteMultipartUpload), so
nobody watching the bucket sees a half-written file. A failed upload is left as it is: the
session policy allows no AbortMultipartUpload, and a lifecycle rule on the service side
removes it.

Part sizes: 8 MiB for the first 1,000 parts, doubling every 1,000 after, so 10,000 parts
reach past S3's 5 TiB limit while small files keep small parts (S3's minimum is 5 MiB).
"""

import logging

import trio

from .errors import MinervaError, StoreError

log = logging.getLogger("minerva.multipart")

MIN_PART = 8 << 20
MAX_PARTS = 10_000
MAX_INFLIGHT = 8  # parts in memory and on the wire per file (boto3's upload_file uses 10 threads)


def part_size(number: int) -> int:
    """Size of part `number` (1-based)."""
    return MIN_PART << ((number - 1) // 1000)


class MultipartSender:
    """One multipart upload of `path`: `send` parts in order, then `complete`."""

    def __init__(self, store, path: str, nursery: trio.Nursery, max_inflight: int = MAX_INFLIGHT,
                 journal=None):
        """`journal` (write-back, see writeback.Journal): an upload id and parts already sent
        by an earlier run, resumed rather than sent again; told of each new one."""
        self.store = store
        self.path = path
        self._nursery = nursery
        self._slots = trio.Semaphore(max_inflight)
        self._journal = journal
        self.upload_id: str | None = journal.upload_id if journal else None
        self._parts: dict[int, str] = dict(journal.parts) if journal else {}
        self.next_part = 1
        self._inflight = 0
        self._idle = trio.Event()
        self._idle.set()
        self.error: MinervaError | None = None
        self.uploaded = 0  # bytes S3 has acknowledged, for status and progress bars

    @property
    def started(self) -> bool:
        return self.upload_id is not None

    def has(self, number: int) -> bool:
        """Whether part `number` was sent by an earlier run (a resumed upload)."""
        return number in self._parts

    async def start(self, metadata: dict[str, str]) -> None:
        """CreateMultipartUpload (the object's metadata is fixed here)."""
        self.upload_id = await self.store.create_multipart(self.path, metadata)
        if self._journal is not None:
            self._journal.started(self.upload_id)

    async def send(self, data, metadata: dict[str, str]) -> None:
        """Queue the next part (waits while `max_inflight` parts are on the wire)."""
        if self.error:
            raise self.error
        if self.upload_id is None:
            await self.start(metadata)
        if self.next_part > MAX_PARTS:
            raise StoreError(f"{self.path} is larger than S3's 10,000-part limit allows")
        number = self.next_part
        self.next_part += 1
        if number in self._parts:  # sent by an earlier run (journaled): not again
            self.uploaded += len(data)
            return
        await self._slots.acquire()
        self._inflight += 1
        self._idle = trio.Event()
        self._nursery.start_soon(self._upload_part, number, data)

    async def _upload_part(self, number: int, data) -> None:
        try:
            self._parts[number] = await self.store.upload_part(self.path, self.upload_id, number, data)
            self.uploaded += len(data)
            if self._journal is not None:
                self._journal.part_done(number, self._parts[number])
        except MinervaError as exc:
            self.error = self.error or exc
        except Exception as exc:  # a bug must surface as EIO at close, not kill the mount
            log.exception("part %d of %s failed", number, self.path)
            self.error = self.error or StoreError(f"part {number} of {self.path}: {exc!r}")
        finally:
            self._slots.release()
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    async def complete(self) -> str:
        """Wait for every part, then make the object appear; returns its ETag."""
        await self._idle.wait()
        if self.error:
            raise self.error
        return await self.store.complete_multipart(self.path, self.upload_id, sorted(self._parts.items()))
