"""Opening, reading, writing and closing files: which handle a file gets, and which close publishes.

Part of Core (a mixin: Core inherits it, so the FUSE adapter sees one object). A file read
from S3 gets a ReadHandle; a new file written front to back a StreamingHandle; everything
else a StagedHandle on a held file (localfiles.py). A writer's close publishes unless
another descriptor of the same open file remains (dup, fork): tests say so exactly
(`still_open`), a real mount counts the opener's writable descriptors in /proc (openers.py).
"""

import logging
import os
import time

import trio

from . import openers
from .errors import (
    Exists,
    IsADirectory,
    MinervaError,
    NotPermitted,
    NotSupported,
    busy,
)
from .handles import Handle, ReadHandle, StagedHandle, StreamingHandle
from .listings import DIR, MISSING
from .localfiles import LocalFile, State
from .namespace import (
    Node,
    check_name,
    is_marker,
    is_temporary,
    require_writable,
)
from .reader import Reader
from .staging import Staged
from .store import ObjectInfo
from .writer import NotSequential, Upload

log = logging.getLogger("minerva.core")

# A close of a process with at most this many descriptors is checked on the event loop
# (~0.3 ms at most): the hand-off to a worker thread costs ~0.13 ms, more than a `cp`'s
# check itself (~0.05 ms), and small copies pay it per file. Larger tables go to a thread.
INLINE_DESCRIPTORS = 40


class FileOps:
    """Core's file operations (Core inherits this; see the module docstring)."""

    def _changeable(self, path: str) -> LocalFile | None:
        """The held file a change applies to; a streamed file already published (its handle
        not yet released) has no content to change: the change starts from S3 again."""
        f = self.files.get(path)
        if f is not None and f.upload is not None and f.state is not State.STREAMING:
            self.files.detach(f)
            return None
        return f

    # ----- opening files ------------------------------------------------------------

    def _take_fh(self) -> int:
        fh, self._next_fh = self._next_fh, self._next_fh + 1
        return fh

    def _open_handle(self, handle: Handle, pid: int | None = None) -> int:
        fh = self._take_fh()
        handle.direct_io = handle.writing and any(
            isinstance(other, ReadHandle) and other.node is handle.node for other in self.handles.values())
        handle.node.opens += 1
        if handle.file is not None:
            self.files.opened(handle.file, handle.writing)
        if pid and self.mountpoint is not None and handle.writing:
            handle.opener = openers.process_of(pid)
        self.handles[fh] = handle
        return fh

    async def open(self, inode: int, flags: int, pid: int | None = None) -> int:
        node = self._node(inode)
        if node.is_dir:
            raise IsADirectory(node.path)
        f = self.files.get(node.path)
        if flags & os.O_ACCMODE == os.O_RDONLY:
            if f is not None and f.state is State.STREAMING:
                raise busy(f"{node.path} is being written; it can be read once closed")
            if f is not None and f.staged is not None:  # held: read what the writers see
                return self._open_handle(StagedHandle(node, file=f), pid)
            return await self._open_object(node)
        require_writable(node.path, "write")
        if node.path in self.aliases:
            raise NotPermitted(f"{node.path} stands for {self._key(node.path)}, which only a folder "
                               "name can show: rename it to write it")
        return await self._open_writer(node, flags, pid, created=False)

    async def _open_object(self, node: Node) -> int:
        if node.parent_path not in self.listings or not node.etag:
            info = await self.store.head(self._key(node.path))
            node.size, node.mtime, node.etag = info.size, info.mtime, info.etag
            self.mtimes[node.path] = (info.etag, info.mtime)
        info = ObjectInfo(self._key(node.path), node.size, node.mtime, node.etag or "")
        keep = bool(info.etag) and self.page_cache_etags.get(node.inode) == info.etag
        if info.etag:
            self.page_cache_etags[node.inode] = info.etag
        return self._open_handle(ReadHandle(node, reader=Reader(self.blocks, info), keep_cache=keep))

    async def _open_writer(self, node: Node, flags: int, pid: int | None, created: bool) -> int:
        """A streaming handle for a new file written front to back; a staged one otherwise."""
        f = self._changeable(node.path)
        while f is not None and not f.settled.is_set():
            # An upload under way: it may end by dropping the file and closing its staging
            # descriptor (no handle held it), so look again once it is done (WB21).
            await self.files.settle(f)
            f = self._changeable(node.path)
        if f is not None and f.state is State.STREAMING:
            raise busy(f"{node.path} is already open for writing")
        truncate = bool(flags & os.O_TRUNC) or created
        if (f is None and flags & os.O_ACCMODE == os.O_WRONLY and truncate
                and not is_temporary(node.path) and self.files.writeback is None):
            upload = Upload(self.store, node.path, self.nursery)
            node.size = 0
            f = self.files.streaming(node.path, upload)
            return self._open_handle(StreamingHandle(node, file=f, writing=True), pid)
        if f is None or created:
            # An empty object is its own base: opening it with O_TRUNC changes nothing.
            empty = ObjectInfo(self._key(node.path), 0, node.mtime, node.etag) \
                if truncate and not created and node.etag and node.size == 0 else None
            f = await self._hold(node, keep=not truncate, base=empty)
        await self.files.settle(f)
        if truncate and f.size:
            await self.files.before_change(f)
            await f.staged.truncate(0)
            self.files.changed(f)
        if not created and flags & os.O_TRUNC:
            self.files.wanted(f)  # opened to be written anew (`: > f`): a file the program wants
        if (created and f.opens == 0 and f.in_s3 is None and flags & os.O_ACCMODE != os.O_WRONLY
                and not flags & os.O_TRUNC):
            # Created as a side effect (read-write or read-only, without O_TRUNC: fallocate,
            # `exec 3<>f`, vim's probe) and never written: not sent at close (LocalFiles.publish).
            # `touch` (write-only) and `open(f, "w+")` (O_TRUNC) mean an empty file: sent.
            self.files.side_effect(f)
        node.size = f.size
        # A read-only creator (open(O_CREAT | O_RDONLY)) is a reader: it never holds back a
        # writer's close, and its own close sends nothing (the file is kept back, or sent
        # when written, truncated or renamed).
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        return self._open_handle(StagedHandle(node, file=f, writing=writing), pid)

    async def _hold(self, node: Node, keep: bool, base: ObjectInfo | None = None) -> LocalFile:
        """A new staged held file for `node`, lazily filled from its object when `keep`."""
        if keep:
            base = await self.store.head(self._key(node.path))
            self.mtimes[node.path] = (base.etag, base.mtime)
        held = self.files.get(node.path)
        if held is not None and not held.created_empty and held.staged is not None:
            return held  # made meanwhile by another open
        staged = Staged(self.store, self.staging, node.path, base)
        return self.files.staged(node.path, staged, dirty=base is None)

    async def create(self, parent_inode: int, name: bytes, flags: int,
                     pid: int | None = None) -> tuple[int, Node]:
        path = self._new_path(parent_inode, name)
        require_writable(path, "create")
        existing = await self._entry(self._dir(parent_inode).path, check_name(name))
        if existing is DIR:
            raise IsADirectory(path)
        if existing is not MISSING and flags & os.O_EXCL:
            raise Exists(path)
        node = self.inodes.upsert(path, False, 0, time.time())
        node.lookups += 1
        return await self._open_writer(node, flags, pid, created=True), node

    async def _restage(self, f: LocalFile) -> None:
        """Move a new file that stopped being sequential from streaming to a staging file.

        Possible while no part has been sent (the first part size, 8 MiB): all bytes are
        still in memory. After that, the bytes sent exist only as parts of an upload that
        cannot be read back, so the write fails with EOPNOTSUPP (logged).
        """
        upload = f.upload
        if not upload.renameable:
            log.warning("refused: non-sequential write to %s after %d bytes were streamed; write "
                        "it front to back, or under a temporary name", upload.path, upload.size)
            raise NotSupported(f"{upload.path}: non-sequential write after streaming began")
        staged = Staged(self.store, self.staging, f.path, None)
        await staged.write(0, upload.buffered())
        staged.mtime = upload.mtime
        self.files.restaged(f, staged)
        for fh, handle in self.handles.items():
            if handle.file is f:
                self.handles[fh] = StagedHandle(handle.node, handle.opener, writing=handle.writing, file=f)

    # ----- reading, writing, closing -------------------------------------------------

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        return await self.handles[fh].read(offset, size)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        try:
            return await self.handles[fh].write(self.files, offset, data)
        except NotSequential:
            await self._restage(self.handles[fh].file)
            return await self.handles[fh].write(self.files, offset, data)

    async def flush(self, fh: int) -> None:
        """close(): a writer's last close publishes; the object is complete in S3 when this
        returns, or it raises (EIO, ENOSPC). A close of a copy (dup, fork) publishes nothing."""
        handle = self.handles[fh]
        if not handle.writing or await self._copy_still_open(fh, handle):
            return
        handle.writing = False
        if self.files.writer_closed(handle.file):
            await self.files.publish(handle.file)

    async def _copy_still_open(self, fh: int, handle: Handle) -> bool:
        """Whether another descriptor of this open file remains: then this close was a copy's."""
        if self.still_open is not None:
            return self.still_open(fh)
        if self.mountpoint is None or handle.opener is None:
            return False
        others = sum(1 for other in self.handles.values() if other is not handle and other.writing
                     and other.file is handle.file and other.opener == handle.opener)
        target = os.path.join(self.mountpoint, handle.node.path)
        fds = openers.descriptors(handle.opener)
        if len(fds) <= INLINE_DESCRIPTORS:
            held = openers.writable_descriptors(handle.opener, target, fds)
        else:
            held = await trio.to_thread.run_sync(
                openers.writable_descriptors, handle.opener, target, fds, limiter=self._proc_limiter)
        if held > others:
            log.debug("close of a copy of %s; the opener still holds it", handle.node.path)
        return held > others

    async def release(self, fh: int) -> None:
        """The last descriptor is gone. A writer whose close was taken for a copy's is
        published here; an error can only be logged now."""
        handle = self.handles.pop(fh)
        f = handle.file
        try:
            if f is None:
                return
            publish = False
            if handle.writing:
                handle.writing = False
                publish = self.files.writer_closed(f)
            publish = self.files.released(f) or publish
            if publish:
                try:
                    await self.files.publish(f)
                except MinervaError as exc:
                    log.error("%s could not be published at its last release: %s", f.path, exc)
            if f.state is State.FAILED and f.opens == 0 and f.spooled is None:
                self.files.dropped_failed(f)
        finally:
            self.inodes.closed(handle.node)

    def _published(self, f: LocalFile, etag: str) -> None:
        """A held file is now an object in S3: what the caches say of it follows."""
        if is_marker(f.path):  # a folder made here (write-back): S3's listing shows it now
            parent, _, name = f.path[:-1].rpartition("/")
            self.listings.update(parent, name, DIR)
            log.info("uploaded the marker of folder %s", f.path[:-1])
            return
        mtime = f.mtime or time.time()
        self.mtimes[f.path] = (etag, mtime)
        node = self.inodes.find(f.path)
        if node is not None:
            node.size, node.etag, node.mtime = f.size, etag, mtime
        parent, _, name = f.path.rpartition("/")
        self.listings.update(parent, name, ObjectInfo(f.path, f.size, mtime, etag or ""))
        log.info("uploaded %s (%d bytes)", f.path, f.size)

