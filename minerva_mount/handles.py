"""Open files: a read handle, a streaming handle or a staged handle, each with its own read/write.

Core keeps them by file handle number and dispatches to them; what happens at close (which
close publishes) is decided by Core with localfiles.py, the owner of every held file.

- ReadHandle: an object in S3, read through the block cache, pinned to the ETag seen at open.
- StreamingHandle: a new file written front to back (writer.Upload); a write out of order
  makes Core swap it for a StagedHandle on the same held file while nothing has been sent.
- StagedHandle: a held file whose content is in a staging file; a reader or a writer.
"""

from dataclasses import dataclass

from .errors import Busy, NotFound, NotPermitted, StoreError
from .localfiles import LocalFile, LocalFiles, State
from .namespace import Node
from .reader import Reader


@dataclass(eq=False)
class Handle:
    node: Node
    opener: int | None = None  # the process that opened it (openers.py), for writers
    keep_cache: bool = False  # the kernel may keep its page cache of this file (same ETag)
    writing: bool = False  # a writer whose last close has not come yet
    file: LocalFile | None = None  # the held file, for streaming and staged handles
    # Writes bypass the kernel's page cache: set on a writer opened while read handles of the
    # old object are open, whose cached pages the kernel would otherwise fill with the new
    # bytes, so a reader would get old bytes, then new ones (a mix no version ever held).
    direct_io: bool = False

    async def read(self, offset: int, size: int):
        raise NotPermitted(f"{self.node.path} was not opened for reading")

    async def write(self, files: LocalFiles, offset: int, data: bytes) -> int:
        raise NotPermitted(f"{self.node.path} was not opened for writing")


@dataclass(eq=False)
class ReadHandle(Handle):
    reader: Reader | None = None

    async def read(self, offset: int, size: int):
        try:
            return await self.reader.read(offset, size)
        except NotFound:  # deleted while open: read(2) has no ENOENT; the object is gone (EIO)
            raise StoreError(f"{self.node.path} was deleted while open for reading") from None


@dataclass(eq=False)
class StreamingHandle(Handle):
    async def read(self, offset: int, size: int):
        raise Busy(f"{self.node.path} is being written; it can be read once closed")

    async def write(self, files: LocalFiles, offset: int, data: bytes) -> int:
        """May raise writer.NotSequential: then Core moves the file to a staging file."""
        written = await self.file.upload.write(offset, data)
        self.node.size = self.file.size
        return written


@dataclass(eq=False)
class StagedHandle(Handle):
    async def read(self, offset: int, size: int):
        return await self.file.staged.read(offset, size)

    async def write(self, files: LocalFiles, offset: int, data: bytes) -> int:
        f = self.file
        await files.before_change(f)  # a publish under way sends what was there at close
        written = await f.staged.write(offset, data)
        if not self.writing and f.state is not State.DETACHED:
            self.writing = True
            files.writing_again(f)
        else:
            files.changed(f)
        self.node.size = f.size
        return written
