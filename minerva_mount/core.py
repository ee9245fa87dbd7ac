"""The file system without the kernel: what each operation means for the storage area.

The FUSE adapter calls these methods with inode numbers and raw names; tests call them the
same way with a FakeStore. Every failure is a MinervaError carrying its errno.

Folder listings are cached for `listing_ttl` seconds and answer lookups, so `ls -l` costs one
LIST per 1,000 entries and no HEAD per file. Files held locally (being written, staged, kept
back under a temporary name) belong to localfiles.py and are shown on top of the listing.
"""

import errno
import logging
import os
import stat
import time

import cachetools
import trio

from . import openers
from .errors import (
    Busy,
    Exists,
    InvalidName,
    IsADirectory,
    MinervaError,
    NameTooLong,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    NotSupported,
)
from .foldermove import check_keys, move_tree
from .handles import Handle, ReadHandle, StagedHandle, StreamingHandle
from .listings import DIR, GONE, ListingCache
from .localfiles import UNSENT, LocalFile, LocalFiles, State
from .namespace import (
    MAX_KEY_BYTES,
    Area,
    InodeTable,
    Node,
    area_of,
    check_name,
    is_temporary,
    join,
    require_changeable,
    require_writable,
)
from .reader import Blocks, Reader
from .shown import convert_listing
from .staging import Staged, StagingArea, check_size
from .store import ObjectInfo
from .writer import NotSequential, Upload

log = logging.getLogger("minerva.core")
MISSING = False  # no such name in the folder (DIR, None, is a folder)

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
SNAPSHOT_ENTRIES = 200_000  # folder entries kept for reuse by the next opendir


def busy(message: str) -> Busy:
    """Every EBUSY is logged with its path and reason (tenet 2)."""
    log.warning("refused: %s", message)
    return Busy(message)


class Core:
    def __init__(self, store, nursery: trio.Nursery, *, listing_ttl: float = 1.0, cache=None,
                 staging: StagingArea | None = None, mountpoint: str | None = None, still_open=None):
        self.store = store
        self.nursery = nursery
        self.blocks = Blocks(store, nursery, cache)
        self.staging = staging or StagingArea.private_temporary()  # tests; the daemon passes one
        self.page_cache_etags: dict[int, str] = {}  # inode -> ETag the kernel's pages hold
        self.on_changed = None  # callback(inode): drop the kernel's pages of a changed object
        self.inodes = InodeTable()
        self.handles: dict[int, Handle] = {}
        self.files = LocalFiles(nursery, self._published)
        self.aliases: dict[str, str] = {}  # shown path -> object path, for shadowed files
        self.mountpoint = mountpoint  # known to a real mount: lets flush ask /proc (openers.py)
        # still_open(fh) -> bool: after a close() of a descriptor of `fh`, does another
        # descriptor of the same open file remain (dup, fork)? Tests answer exactly; a real
        # mount asks /proc (openers.py).
        self.still_open = still_open
        self._proc_limiter = trio.CapacityLimiter(1)
        # mtimes stored in metadata, which LIST does not return: path -> (etag, mtime), learnt
        # at upload, HEAD and utimens, so `ls -l` shows them without a HEAD per file.
        self.mtimes: cachetools.LRUCache = cachetools.LRUCache(maxsize=100_000)
        self.listings = ListingCache(store, self.inodes, self.files, ttl=listing_ttl,
                                     convert=self._convert_listing)
        self._dir_snapshots: dict[int, list[tuple[str, Node]]] = {}
        # Last opendir's (name, node) list per folder (see opendir), bounded by entries held.
        self._snapshots: cachetools.LRUCache = cachetools.LRUCache(
            maxsize=SNAPSHOT_ENTRIES, getsizeof=lambda cached: max(len(cached[2]), 1))
        self._next_fh = 1

    # ----- names and listings ---------------------------------------------------------

    async def _listing(self, dir_path: str) -> dict[str, ObjectInfo | None]:
        """The folder as S3 listed it (cached): never copied, since lookups come per name."""
        entries = self.listings.get(dir_path)
        if entries is None:
            # Not cached if the folder changes while the LIST is under way: that answer may
            # predate the change (a file published meanwhile would vanish for a while).
            entries = await self.listings.fetch(dir_path)
        return entries

    async def _entry(self, dir_path: str, name: str):
        """One name of a folder: its entry, DIR, or MISSING; costs a dict lookup when cached."""
        held = self.files.get(join(dir_path, name))
        if held is not None:
            return held.entry()
        return (await self._listing(dir_path)).get(name, MISSING)

    async def _in_s3(self, path: str) -> bool:
        """Whether S3 holds an object under `path`, as the (cached, self-patched) listing says."""
        parent, _, name = path.rpartition("/")
        entry = (await self._listing(parent)).get(name, MISSING)
        return entry is not MISSING and entry is not DIR

    async def _entries(self, dir_path: str) -> dict[str, ObjectInfo | None]:
        """The whole folder with the files held here on top (for readdir)."""
        result = dict(await self._listing(dir_path))
        for f in self.files.in_folder(dir_path):
            result[f.path.rpartition("/")[2]] = f.entry()
        return result

    def _convert_listing(self, dir_path: str, listing) -> dict[str, ObjectInfo | None]:
        return convert_listing(dir_path, listing, self.aliases, self.mtimes)

    def _key(self, path: str) -> str:
        """The object path behind a shown path (differs only for shadowed files)."""
        return self.aliases.get(path, path)

    def _node_for(self, path: str, entry: ObjectInfo | None) -> Node:
        if entry is DIR:
            return self.inodes.upsert(path, True)
        node = self.inodes.upsert(path, False, entry.size, entry.mtime, entry.etag or None)
        self._check_pages(node)
        return node

    def _check_pages(self, node: Node) -> None:
        """The object changed since the kernel cached its pages: have them dropped."""
        cached = self.page_cache_etags.get(node.inode)
        if cached is not None and node.etag and cached != node.etag:
            del self.page_cache_etags[node.inode]
            if self.on_changed is not None:
                self.on_changed(node.inode)

    def _dir(self, inode: int) -> Node:
        node = self._node(inode)
        if not node.is_dir:
            raise NotADirectory(node.path)
        return node

    def _node(self, inode: int) -> Node:
        try:
            return self.inodes.get(inode)
        except KeyError:
            raise NotFound(f"inode {inode}") from None

    async def _child(self, parent_inode: int, name: bytes) -> tuple[str, ObjectInfo | None]:
        parent = self._dir(parent_inode)
        try:
            text = check_name(name)  # a name over 255 bytes: ENAMETOOLONG, as create answers
        except InvalidName:
            raise NotFound("unusable name") from None
        entry = await self._entry(parent.path, text)
        if entry is MISSING:
            self.listings.absent(parent.path, text)
            raise NotFound(join(parent.path, text))
        return join(parent.path, text), entry

    def _new_path(self, parent_inode: int, name: bytes) -> str:
        path = join(self._dir(parent_inode).path, check_name(name))
        if len(path.encode()) > MAX_KEY_BYTES:
            raise NameTooLong(f"{path}: longer than an S3 key may be")
        return path

    # ----- attributes ---------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes) -> Node:
        path, entry = await self._child(parent_inode, name)
        node = self._node_for(path, entry)
        node.lookups += 1
        return node

    def forget(self, inode: int, count: int) -> None:
        self.inodes.forget(inode, count)
        if inode not in self.inodes.by_inode:
            self.page_cache_etags.pop(inode, None)

    def remember(self, node: Node) -> None:
        """The kernel took a reference (readdirplus entry accepted)."""
        self.inodes.remember(node)

    async def getattr(self, inode: int) -> Node:
        node = self._node(inode)
        f = self.files.get(node.path)
        if f is not None:
            node.size = f.size
            node.mtime = f.mtime or node.mtime
        return node

    async def setattr(self, inode: int, size: int | None = None, mtime: float | None = None) -> Node:
        """chmod/chown always succeed (not persisted); size and mtime apply to files held here.

        A truncate by path (no writer open) is published before it returns, as close would.
        """
        node = self._node(inode)
        if size is not None:
            await self._truncate(node, size)
        if mtime is not None:
            f = self.files.get(node.path)
            if f is not None and f.state in UNSENT:
                f.mtime = mtime
            elif node.etag:
                # Already uploaded: shown from memory, not persisted (a copy would re-publish it).
                self.mtimes[node.path] = (node.etag, mtime)
            node.mtime = mtime
        return node

    def _changeable(self, path: str) -> LocalFile | None:
        """The held file a change applies to; a streamed file already published (its handle
        not yet released) has no content to change: the change starts from S3 again."""
        f = self.files.get(path)
        if f is not None and f.upload is not None and f.state is not State.STREAMING:
            self.files.detach(f)
            return None
        return f

    async def _truncate(self, node: Node, size: int) -> None:
        check_size(node.path, size)
        f = self._changeable(node.path)
        if f is None:
            if size == node.size:
                return
            require_writable(node.path, "truncate")
            f = await self._hold(node, keep=True)
        await self.files.settle(f)
        if f.upload is not None:
            try:
                await f.upload.truncate(size)
            except NotSequential:
                await self._restage(f)
        if f.staged is not None:
            await f.staged.truncate(size)
        self.files.changed(f)
        node.size = f.size
        if f.writers == 0:
            await self.files.publish(f)

    # ----- folders ------------------------------------------------------------------

    async def opendir(self, inode: int) -> int:
        node = self._dir(inode)
        listing = await self._listing(node.path)
        snapshot = self._reusable_snapshot(node.path, listing)
        if snapshot is None:
            version = self.listings.version
            entries = await self._entries(node.path)
            snapshot = [(name, self._node_for(join(node.path, name), entry))
                        for name, entry in sorted(entries.items())]
            if (self.listings.get(node.path) is listing and not self.files.in_folder(node.path)
                    and len(snapshot) <= SNAPSHOT_ENTRIES):
                self._snapshots[node.path] = (listing, version, snapshot)
        fh = self._take_fh()
        self.listings.opened(fh, node.path)
        self._dir_snapshots[fh] = snapshot
        return fh

    def _reusable_snapshot(self, dir_path: str, listing) -> list[tuple[str, Node]] | None:
        """The last opendir's (name, node) list, if nothing changed since: `ls` and file
        managers list the same folder again and again, and sorting and matching 10,000 names
        to nodes each time is most of a warm listing's cost. Unchanged means: the same cached
        listing, no change made through the mount, no file of the folder held here, and every
        node still the one its path resolves to (the kernel forgets nodes it no longer holds)."""
        cached = self._snapshots.get(dir_path)
        if cached is None or cached[0] is not listing or cached[1] != self.listings.version:
            return None
        if self.files.in_folder(dir_path):
            return None
        by_path, prefix = self.inodes.by_path, join(dir_path, "")
        if any(by_path.get(prefix + name) is not node for name, node in cached[2]):
            del self._snapshots[dir_path]
            return None
        return cached[2]

    def readdir(self, fh: int, start: int) -> list[tuple[str, Node]]:
        return self._dir_snapshots[fh][start:]

    def releasedir(self, fh: int) -> None:
        self._dir_snapshots.pop(fh, None)
        self.listings.closed(fh)

    async def mkdir(self, parent_inode: int, name: bytes) -> Node:
        path = self._new_path(parent_inode, name)
        require_changeable(path, "mkdir")
        if await self._entry(self._dir(parent_inode).path, check_name(name)) is not MISSING:
            raise Exists(path)
        await self.store.put(path + "/", b"", {})
        self.listings.update(self._dir(parent_inode).path, check_name(name), DIR)
        node = self.inodes.upsert(path, True, mtime=time.time())
        node.lookups += 1
        return node

    async def rmdir(self, parent_inode: int, name: bytes) -> None:
        path, entry = await self._child(parent_inode, name)
        require_changeable(path, "rmdir")
        if entry is not DIR:
            raise NotADirectory(path)
        held = self.files.under(path)
        if held or await self.store.has_children(path + "/"):
            if held:
                log.info("rmdir %s: not empty (%s is held here, %s)", path, held[0].path, held[0].state.value)
            raise NotEmpty(path)
        await self.store.delete(path + "/")
        self.listings.update(self._dir(parent_inode).path, check_name(name), GONE)
        self.listings.forget(path)
        self.inodes.removed(path)

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
        if f is not None and f.state is State.STREAMING:
            raise busy(f"{node.path} is already open for writing")
        truncate = bool(flags & os.O_TRUNC) or created
        if (f is None and flags & os.O_ACCMODE == os.O_WRONLY and truncate
                and not is_temporary(node.path)):
            upload = Upload(self.store, node.path, self.nursery)
            node.size = 0
            f = self.files.streaming(node.path, upload)
            return self._open_handle(StreamingHandle(node, file=f, writing=True), pid)
        if f is None or created:
            f = await self._hold(node, keep=not truncate)
        await self.files.settle(f)
        if truncate and f.size:
            await f.staged.truncate(0)
            self.files.changed(f)
        if created and f.opens == 0 and f.in_s3 is None:
            # Created without being opened for writing (fallocate, `exec 3<>f`) and never
            # written: not sent at close (see LocalFiles.publish).
            f.created_empty = flags & os.O_ACCMODE != os.O_WRONLY
        node.size = f.size
        return self._open_handle(StagedHandle(node, file=f, writing=True), pid)

    async def _hold(self, node: Node, keep: bool) -> LocalFile:
        """A new staged held file for `node`, lazily filled from its object when `keep`."""
        base = None
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
        held = await trio.to_thread.run_sync(
            openers.writable_descriptors, handle.opener, target, limiter=self._proc_limiter)
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
            if f.state is State.FAILED and f.opens == 0:
                self.files.dropped_failed(f)
        finally:
            self.inodes.closed(handle.node)

    def _published(self, f: LocalFile, etag: str) -> None:
        """A held file is now an object in S3: what the caches say of it follows."""
        mtime = f.mtime or time.time()
        self.mtimes[f.path] = (etag, mtime)
        node = self.inodes.find(f.path)
        if node is not None:
            node.size, node.etag, node.mtime = f.size, etag, mtime
        parent, _, name = f.path.rpartition("/")
        self.listings.update(parent, name, ObjectInfo(f.path, f.size, mtime, etag or ""))
        log.info("uploaded %s (%d bytes)", f.path, f.size)

    # ----- unlink and rename ------------------------------------------------------------

    async def unlink(self, parent_inode: int, name: bytes) -> None:
        path, entry = await self._child(parent_inode, name)
        require_changeable(path, "unlink")
        if entry is DIR:
            raise IsADirectory(path)
        f = self.files.get(path)
        if f is not None:
            await self.files.settle(f)  # a publish under way completes first, then goes
            if self.files.get(path) is f:
                self.files.detach(f)
        if self._key(path) != path or await self._in_s3(path):
            await self.store.delete(self._key(path))
        self.listings.update(self._dir(parent_inode).path, check_name(name), GONE)
        self.inodes.removed(path)

    async def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
                     flags: int = 0) -> None:
        src, entry = await self._child(old_parent, old_name)
        dst = self._new_path(new_parent, new_name)
        require_changeable(src, "rename")
        require_changeable(dst, "rename")
        if area_of(dst) is not Area.INCOMING and src.split("/")[0] != dst.split("/")[0]:
            log.warning("refused rename %s -> %s: files may only move into Incoming/", src, dst)
            raise NotPermitted(f"rename {src} -> {dst}")
        if flags & RENAME_EXCHANGE:
            raise MinervaError("rename exchange is not supported", err=errno.EINVAL)
        target = await self._entry(self._dir(new_parent).path, check_name(new_name))
        if target is not MISSING and flags & RENAME_NOREPLACE:
            raise Exists(dst)
        if entry is DIR:
            await self._rename_dir(src, dst, target)
        else:
            await self._rename_file(src, dst, target)
        self.listings.forget(self._dir(old_parent).path)
        self.listings.forget(self._dir(new_parent).path)
        self.inodes.moved(src, dst)

    async def _rename_file(self, src: str, dst: str, target) -> None:
        if target is DIR:
            raise IsADirectory(dst)
        for held in (self.files.get(dst), self.files.get(src)):
            if held is not None:
                await self.files.settle(held)
        f = self.files.get(src)
        if f is not None and f.state in UNSENT:
            await self._rename_held(f, src, dst)
            return
        if area_of(dst) is Area.INCOMING and is_temporary(dst) and self._key(src) == src:
            # Renamed TO a temporary name: it leaves S3 and is held here until renamed back.
            node = self.inodes.find(src) or self.inodes.upsert(src, False)
            f = self._changeable(src) or await self._hold(node, keep=True)
            await f.staged.fill_all()
            await self.store.delete(src)
            self.files.renamed(f, dst)
            self.files.changed(f)
            await self.files.publish(f)  # keeps it back
            return
        size = f.size if f is not None else getattr(self.inodes.find(src), "size", None)
        etag = await self.store.copy(self._key(src), dst, size)  # the new name shows before the old goes
        await self.store.delete(self._key(src))
        known = self.mtimes.pop(src, None)
        if known is not None and etag:
            self.mtimes[dst] = (etag, known[1])
        old = self.files.get(dst)
        if old is not None:
            self.files.detach(old)
        if f is not None:  # published, still open: it goes on under the new name
            self.files.renamed(f, dst)
            if f.staged is not None:
                f.staged.rebase(ObjectInfo(dst, f.size, f.mtime or 0.0, etag))

    async def _rename_held(self, f: LocalFile, src: str, dst: str) -> None:
        """A file with content not yet sent takes its new name locally; S3 loses the old name."""
        if f.upload is not None and not f.upload.renameable:
            raise busy(f"{src} is being uploaded (parts sent); rename it after it is closed")
        base = f.in_s3
        if base is not None and base.path == src:
            if is_temporary(dst):
                await f.staged.fill_all()  # the object goes; its bytes stay here
            else:
                etag = await self.store.copy(src, dst, base.size)
                f.staged.rebase(ObjectInfo(dst, base.size, base.mtime, etag))
        if await self._in_s3(src):
            await self.store.delete(src)
        self.files.renamed(f, dst)
        if f.writers == 0 and f.state in (State.KEPT_BACK, State.STAGED) and not is_temporary(dst):
            f.created_empty = False  # renamed to a final name: the user wants it there
            f.state = State.STAGED
            try:
                await self.files.publish(f)
            except MinervaError:
                if self.files.get(dst) is f:  # keep it, under its old name, for a retry
                    self.files.renamed(f, src)
                    f.state = State.KEPT_BACK
                raise

    async def _rename_dir(self, src: str, dst: str, target) -> None:
        if target is not MISSING and target is not DIR:
            raise NotADirectory(dst)
        if target is DIR and await self.store.has_children(dst + "/"):
            raise NotEmpty(dst)
        for f in self.files.under(src):
            await self.files.settle(f)
        unsent = [f for f in self.files.under(src) if f.state in UNSENT]
        if unsent:
            raise busy(f"{src} holds {unsent[0].path}, not uploaded yet ({unsent[0].state.value}); "
                       "rename the folder once it is")
        objects = await self.store.list_tree(src + "/")
        check_keys(src, dst, objects)
        await move_tree(self.store, src, dst, objects)
        for f in self.files.under(src):  # published, still open: they go on under the new names
            self.files.renamed(f, dst + f.path[len(src):])
        for path in [p for p in self.listings if p == src or p.startswith(src + "/")]:
            self.listings.forget(path)

    # ----- whole file system --------------------------------------------------------

    def cache_stats(self) -> dict:
        return self.blocks.stats()

    def statfs(self) -> dict[str, int]:
        """Ample free space, so file managers never refuse a copy for lack of room."""
        block = 1 << 20
        total = (1 << 50) // block  # 1 PiB
        return {"f_bsize": block, "f_frsize": block, "f_blocks": total, "f_bfree": total,
                "f_bavail": total, "f_files": 1 << 32, "f_ffree": 1 << 32,
                "f_favail": 1 << 32, "f_namemax": 255}

    async def drain(self, timeout: float) -> list[str]:
        """Wait until no held file has content still to send, up to `timeout`.

        Returns the paths still unfinished (open, failed, or kept back under a temporary name).
        """
        with trio.move_on_after(timeout):
            await self.files.idle.wait()
        return sorted(f.path for f in self.files.unfinished())


def mode_of(node: Node) -> int:
    return (stat.S_IFDIR | 0o755) if node.is_dir else (stat.S_IFREG | 0o644)
