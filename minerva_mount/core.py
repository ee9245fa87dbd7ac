"""The file system without the kernel: what each operation means for the storage area.

The FUSE adapter calls these methods with inode numbers and raw names; tests call them the
same way with a FakeStore. Every failure is a MinervaError carrying its errno.

Folder listings are cached for `listing_ttl` seconds and answer lookups, so `ls -l` costs one
LIST per 1,000 entries and no HEAD per file. New files being written ("pending") are shown
from memory on top of the listing until their upload completes at close.
"""

import errno
import logging
import os
import stat
import time
from dataclasses import dataclass, replace

import cachetools
import trio

from . import openers
from .blockcache import default_cache_dir
from .errors import (
    Exists,
    IsADirectory,
    MinervaError,
    NameTooLong,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
)
from .listings import DIR, GONE, ListingCache
from .namespace import (
    INCOMING,
    MAX_KEY_BYTES,
    OUTGOING,
    SHADOWED_SUFFIX,
    Area,
    InodeTable,
    Node,
    area_of,
    check_name,
    join,
    require_changeable,
    require_writable,
    shown_name,
)
from .reader import Blocks, Reader
from .staging import Staged, is_temporary
from .store import ObjectInfo
from .writer import NotSequential, Upload

log = logging.getLogger("minerva.core")
MISSING = False  # no such name in the folder (DIR, None, is a folder)

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
MAX_COPIES = 8  # server-side copies in flight while a folder is renamed
SNAPSHOT_ENTRIES = 200_000  # folder entries kept for reuse by the next opendir


class Busy(MinervaError):
    errno = errno.EBUSY


class NotSupported(MinervaError):
    errno = errno.EOPNOTSUPP


@dataclass
class Handle:
    node: Node
    reader: Reader | None = None
    upload: Upload | None = None
    keep_cache: bool = False  # the kernel may keep its page cache of this file (same ETag)
    opener: int | None = None  # the process that opened it, see openers.py

    staged: Staged | None = None
    writer: bool = False


class Core:
    def __init__(self, store, nursery: trio.Nursery, *, listing_ttl: float = 1.0, cache=None,
                 staging_dir: str | None = None, mountpoint: str | None = None, still_open=None):
        self.store = store
        # still_open(fh) -> bool: after a close() of a descriptor of `fh`, does another
        # descriptor of the same open file remain (dup, fork)? Tests answer exactly; a real
        # mount asks /proc (openers.py).
        self.still_open = still_open
        self.nursery = nursery
        self.blocks = Blocks(store, nursery, cache)
        self.page_cache_etags: dict[int, str] = {}  # inode -> ETag the kernel's pages hold
        self.on_changed = None  # callback(inode): drop the kernel's pages of a changed object
        self.inodes = InodeTable()
        self.handles: dict[int, Handle] = {}
        self.pending: dict[str, Upload] = {}
        self.completed = 0  # files uploaded since the mount started
        self.aliases: dict[str, str] = {}  # shown path -> object path, for shadowed files
        self.staged: dict[str, Staged] = {}  # files changed through a local copy (staging.py)
        self.staging_dir = staging_dir or str(default_cache_dir() / "staging")
        self.mountpoint = mountpoint  # known to a real mount: lets flush ask /proc (openers.py)
        self._proc_limiter = trio.CapacityLimiter(1)
        # mtimes stored in metadata, which LIST does not return: path -> (etag, mtime), learnt
        # at upload, HEAD and utimens, so `ls -l` shows them without a HEAD per file.
        self.mtimes: cachetools.LRUCache = cachetools.LRUCache(maxsize=100_000)
        self.listings = ListingCache(store, self.inodes, self.pending, ttl=listing_ttl,
                                     convert=self._convert_listing)
        self._dir_snapshots: dict[int, list[tuple[str, Node]]] = {}
        # Last opendir's (name, node) list per folder (see opendir), bounded by entries held.
        self._snapshots: cachetools.LRUCache = cachetools.LRUCache(
            maxsize=SNAPSHOT_ENTRIES, getsizeof=lambda cached: max(len(cached[2]), 1))
        self._next_fh = 1
        self._idle = trio.Event()  # set while no file is open for writing
        self._idle.set()

    # ----- names and listings ---------------------------------------------------------

    async def _listing(self, dir_path: str) -> dict[str, ObjectInfo | None]:
        """The folder as S3 listed it (cached): never copied, since lookups come per name."""
        entries = self.listings.get(dir_path)
        if entries is None:
            # Not cached if the folder changes while the LIST is under way: that answer may
            # predate the change (a file published meanwhile would vanish for a while).
            entries = await self.listings.fetch(dir_path)
        return entries

    def _local_entry(self, path: str) -> ObjectInfo | None:
        """A file held here (being written, or staged) as the listing shows it, else None."""
        if (upload := self.pending.get(path)) is not None:
            return ObjectInfo(path, upload.size, upload.mtime or time.time(), "")
        if (staged := self.staged.get(path)) is not None:
            mtime = staged.mtime or (staged.base.mtime if staged.base else time.time())
            return ObjectInfo(path, staged.size, mtime, "")
        return None

    async def _entry(self, dir_path: str, name: str):
        """One name of a folder: its entry, DIR, or MISSING; costs a dict lookup when cached."""
        local = self._local_entry(join(dir_path, name))
        if local is not None:
            return local
        return (await self._listing(dir_path)).get(name, MISSING)

    def _holds_files_in(self, dir_path: str) -> bool:
        """Whether a file of this folder is being written or staged here."""
        return any(p.rpartition("/")[0] == dir_path for p in [*self.pending, *self.staged])

    async def _entries(self, dir_path: str) -> dict[str, ObjectInfo | None]:
        """The whole folder with the files held here on top (for readdir)."""
        result = dict(await self._listing(dir_path))
        for path in [*self.pending, *self.staged]:
            parent, _, name = path.rpartition("/")
            if parent == dir_path:
                result[name] = self._local_entry(path)
        return result

    def _convert_listing(self, dir_path: str, listing) -> dict[str, ObjectInfo | None]:
        """One LIST answer as shown names: folders, files, aliases of shadowed files."""
        entries = {}
        for sub in listing.dirs:
            name = sub.rstrip("/")
            if shown_name(name):
                entries[name] = DIR
        shadowed = []
        for info in listing.files:
            name = info.path.rsplit("/", 1)[-1]
            if not shown_name(name):
                log.info("not shown: object %r (name unusable as a file name)", info.path)
            elif name in entries:
                shadowed.append(info)
            else:
                known = self.mtimes.get(info.path)
                entries[name] = replace(info, mtime=known[1]) if known and known[0] == info.etag else info
        self._show_shadowed(dir_path, entries, shadowed)
        if dir_path == "":
            entries.setdefault(INCOMING, DIR)
            entries.setdefault(OUTGOING, DIR)
        return entries

    def _show_shadowed(self, dir_path: str, entries: dict, shadowed: list[ObjectInfo]) -> None:
        """Files whose name a folder also has ('a' and 'a/b'): shown as 'a (file)', read-only.

        The folder keeps the plain name (it holds other files); the file stays readable,
        deletable and renamable under the alias, so neither hides the other.
        """
        for alias in [p for p in self.aliases if p.rpartition("/")[0] == dir_path]:
            del self.aliases[alias]
        for info in shadowed:
            alias = info.path.rsplit("/", 1)[-1] + SHADOWED_SUFFIX
            if alias in entries or not shown_name(alias):
                log.info("not shown: object %r (its name and its alias are taken)", info.path)
                continue
            log.info("shown as %r: object %r, whose name a folder also has", alias, info.path)
            entries[alias] = info
            self.aliases[join(dir_path, alias)] = info.path

    def _key(self, path: str) -> str:
        """The object path behind a shown path (differs only for shadowed files)."""
        return self.aliases.get(path, path)

    def _forget_listing(self, dir_path: str) -> None:
        self.listings.forget(dir_path)

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
            text = check_name(name)
        except MinervaError:
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
        upload = self.pending.get(node.path)
        if upload is not None:
            node.size = upload.size
        staged = self.staged.get(node.path)
        if staged is not None:
            node.size = staged.size
            node.mtime = staged.mtime or node.mtime
        return node

    async def setattr(self, inode: int, size: int | None = None, mtime: float | None = None) -> Node:
        """chmod/chown always succeed (not persisted); size and mtime apply to new files."""
        node = self._node(inode)
        upload = self.pending.get(node.path)
        staged = self.staged.get(node.path)
        if size is not None and staged is None and upload is not None:
            try:
                await upload.truncate(size)
                node.size = upload.size
            except NotSequential:
                staged = await self._restage(upload)
        if size is not None and staged is not None:
            await staged.truncate(size)
            node.size = staged.size
        elif size is not None and upload is None and size != node.size:
            require_writable(node.path, "truncate")  # truncate by path: stage, change, upload
            staged = await self._stage(node, keep=True)
            staged.opens += 1
            staged.writers += 1
            try:
                await staged.truncate(size)
            finally:
                staged.opens -= 1
                staged.writers -= 1
                await self._staged_closed(staged, node)
        if mtime is not None:
            if staged is not None and node.path in self.staged:
                staged.mtime = mtime
            elif upload is not None and node.path in self.pending:
                upload.mtime = mtime
            elif node.etag:
                # Already uploaded: shown from memory, not persisted (a copy would re-publish it).
                self.mtimes[node.path] = (node.etag, mtime)
            node.mtime = mtime
        return node

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
            if (self.listings.get(node.path) is listing and not self._holds_files_in(node.path)
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
        if self._holds_files_in(dir_path):
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
        if any(p.startswith(path + "/") for p in self.pending) or await self.store.has_children(path + "/"):
            raise NotEmpty(path)
        await self.store.delete(path + "/")
        self.listings.update(self._dir(parent_inode).path, check_name(name), GONE)
        self._forget_listing(path)
        self.inodes.removed(path)

    # ----- files --------------------------------------------------------------------

    def _take_fh(self) -> int:
        fh, self._next_fh = self._next_fh, self._next_fh + 1
        return fh

    def _open_handle(self, handle: Handle) -> int:
        fh = self._take_fh()
        handle.node.opens += 1
        self.handles[fh] = handle
        return fh

    async def open(self, inode: int, flags: int, pid: int | None = None) -> int:
        fh = await self._open(inode, flags)
        self._note_opener(fh, pid)
        return fh

    def _note_opener(self, fh: int, pid: int | None) -> None:
        handle = self.handles[fh]
        if pid and self.mountpoint is not None and (handle.upload or handle.writer):
            handle.opener = openers.process_of(pid)

    async def _open(self, inode: int, flags: int) -> int:
        node = self._node(inode)
        if node.is_dir:
            raise IsADirectory(node.path)
        staged = self.staged.get(node.path)
        if flags & os.O_ACCMODE == os.O_RDONLY:
            if node.path in self.pending:
                raise Busy(f"{node.path} is being written; it can be read once closed")
            if staged is not None:  # being changed: read what the writers see
                staged.opens += 1
                return self._open_handle(Handle(node, staged=staged))
            if node.parent_path not in self.listings or not node.etag:
                info = await self.store.head(self._key(node.path))
                node.size, node.mtime, node.etag = info.size, info.mtime, info.etag
                self.mtimes[node.path] = (info.etag, info.mtime)
            info = ObjectInfo(self._key(node.path), node.size, node.mtime, node.etag or "")
            keep = bool(info.etag) and self.page_cache_etags.get(inode) == info.etag
            if info.etag:
                self.page_cache_etags[inode] = info.etag
            return self._open_handle(Handle(node, reader=Reader(self.blocks, info), keep_cache=keep))
        require_writable(node.path, "write")
        if node.path in self.aliases:
            raise NotPermitted(f"{node.path} stands for {self._key(node.path)}, which only a folder "
                               "name can show: rename it to write it")
        if node.path in self.pending:
            raise Busy(f"{node.path} is already open for writing")
        if staged is None and self._streamable(node.path, flags):
            return self._start_upload(node)
        return await self._open_staged(node, flags, keep=not flags & os.O_TRUNC)

    @staticmethod
    def _streamable(path: str, flags: int) -> bool:
        """A write-only truncating open of a final name streams; everything else stages."""
        return (flags & os.O_ACCMODE == os.O_WRONLY and bool(flags & os.O_TRUNC)
                and not is_temporary(path))

    async def _stage(self, node: Node, keep: bool) -> Staged:
        """The shared staging file of `node`, made (lazily filled from the object) if needed."""
        staged = self.staged.get(node.path)
        if staged is None:
            base = None
            if keep:
                base = await self.store.head(node.path)
                self.mtimes[node.path] = (base.etag, base.mtime)
            staged = self.staged.setdefault(node.path, Staged(self.store, node.path, self.staging_dir, base))
            self._busy()
        return staged

    async def _open_staged(self, node: Node, flags: int, keep: bool) -> int:
        staged = await self._stage(node, keep)
        if flags & os.O_TRUNC and staged.size:
            await staged.truncate(0)
            staged.written = False  # sent at the last close; a close() before any write (dd) is not the end
        staged.opens += 1
        staged.writers += 1
        node.size = staged.size
        return self._open_handle(Handle(node, staged=staged, writer=True))

    async def _restage(self, upload: Upload) -> Staged:
        """Move a new file that stopped being sequential from streaming to a staging file.

        Possible while no part has been sent (the first part size, 8 MiB): all bytes are
        still in memory. After that, the bytes sent exist only as parts of an upload that
        cannot be read back, so the write fails with EOPNOTSUPP (logged).
        """
        if not upload.renameable:
            log.warning("refused: non-sequential write to %s after %d bytes were streamed; write "
                        "it front to back, or under a temporary name", upload.path, upload.size)
            raise NotSupported(f"{upload.path}: non-sequential write after streaming began")
        staged = Staged(self.store, upload.path, self.staging_dir, None)
        await staged.write(0, upload.buffered())
        staged.mtime = upload.mtime
        self.staged[upload.path] = staged
        self._drop_pending(upload)
        self._busy()
        for handle in self.handles.values():
            if handle.upload is upload:
                handle.upload, handle.staged, handle.writer = None, staged, True
                staged.opens += 1
                staged.writers += 1
        upload.finished = True  # nothing of it will be sent
        return staged

    def _busy(self) -> None:
        if self._idle.is_set():
            self._idle = trio.Event()

    def _start_upload(self, node: Node) -> int:
        upload = Upload(self.store, node.path, self.nursery)
        self.pending[node.path] = upload
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        node.size = 0
        return self._open_handle(Handle(node, upload=upload))

    async def create(self, parent_inode: int, name: bytes, flags: int,
                     pid: int | None = None) -> tuple[int, Node]:
        fh, node = await self._create(parent_inode, name, flags)
        self._note_opener(fh, pid)
        return fh, node

    async def _create(self, parent_inode: int, name: bytes, flags: int) -> tuple[int, Node]:
        path = self._new_path(parent_inode, name)
        require_writable(path, "create")
        existing = await self._entry(self._dir(parent_inode).path, check_name(name))
        if existing is DIR:
            raise IsADirectory(path)
        if existing is not False and flags & os.O_EXCL:
            raise Exists(path)
        if path in self.pending:
            raise Busy(f"{path} is already open for writing")
        node = self.inodes.upsert(path, False, 0, time.time())
        node.lookups += 1
        if path not in self.staged and self._streamable(path, flags | os.O_TRUNC):
            return self._start_upload(node), node
        return await self._open_staged(node, flags | os.O_TRUNC, keep=False), node

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self.handles[fh]
        if handle.staged is not None:
            return await handle.staged.read(offset, size)
        if handle.reader is None:
            raise NotPermitted(f"{handle.node.path} was not opened for reading")
        return await handle.reader.read(offset, size)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        handle = self.handles[fh]
        if handle.upload is not None:
            try:
                written = await handle.upload.write(offset, data)
                handle.node.size = handle.upload.size
                return written
            except NotSequential:
                await self._restage(handle.upload)
        if handle.staged is None:
            raise NotPermitted(f"{handle.node.path} was not opened for writing")
        written = await handle.staged.write(offset, data)
        handle.node.size = handle.staged.size
        return written

    async def flush(self, fh: int) -> None:
        """close(): the object is complete in S3 when this returns, or it raises (EIO).

        A flush before any write is skipped: programs such as dd dup2 a new file onto
        stdout and close the original first, so that flush is not the end of the file.
        """
        handle = self.handles[fh]
        if self.still_open is not None:
            if (handle.upload or handle.writer) and self.still_open(fh):
                return
        elif await self._copy_still_open(handle):
            return
        if handle.upload is not None and handle.upload.written:
            await self._publish(handle)
        staged = handle.staged
        # Sent when its only writer closes; with several writers, when the last one does.
        if (staged is not None and handle.writer and staged.writers == 1 and staged.written
                and not staged.failed and self._sendable(staged)):
            await self._send_staged(staged, handle.node)

    async def _copy_still_open(self, handle: Handle) -> bool:
        """Whether the opener still holds the file: then this close was a forked child's copy."""
        if self.mountpoint is None or handle.opener is None or not (handle.upload or handle.writer):
            return False
        target = os.path.join(self.mountpoint, handle.node.path)
        held = await trio.to_thread.run_sync(
            openers.holds_open, handle.opener, target, limiter=self._proc_limiter)
        if held:
            log.debug("close of a copy of %s; the opener still holds it", handle.node.path)
        return held

    async def release(self, fh: int) -> None:
        """The last descriptor is gone: publish a file that was never written (touch)."""
        handle = self.handles.pop(fh)
        upload = handle.upload
        if handle.staged is not None:
            handle.staged.opens -= 1
            handle.staged.writers -= handle.writer
            try:
                await self._staged_closed(handle.staged, handle.node)
            finally:
                self.inodes.closed(handle.node)
            return
        try:
            if upload is not None and not upload.finished and not upload.failed:
                await self._publish(handle)
        except MinervaError as exc:
            log.error("%s could not be published at close: %s", upload.path, exc)
        finally:
            if upload is not None and self._drop_pending(upload):
                log.warning("%s was closed without a complete upload; nothing was published",
                            upload.path)
                self.listings.vanished(upload.path, handle.node.inode)
                self.inodes.removed(upload.path)
            self.inodes.closed(handle.node)

    def _drop_pending(self, upload: Upload) -> bool:
        if self.pending.get(upload.path) is not upload:
            return False
        del self.pending[upload.path]
        self._maybe_idle()
        return True

    def _maybe_idle(self) -> None:
        if not self.pending and not any(s.writers for s in self.staged.values()):
            self._idle.set()

    def _sendable(self, staged: Staged) -> bool:
        """Still the file under its name, and not a temporary name kept back until renamed."""
        return self.staged.get(staged.path) is staged and not staged.temporary

    async def _send_staged(self, staged: Staged, node: Node) -> None:
        try:
            etag = await staged.upload()
        except MinervaError as exc:
            staged.failed = True
            log.error("upload of %s failed: %s", staged.path, exc)
            raise
        self.mtimes[staged.path] = (etag, staged.mtime)
        if node.path == staged.path:
            node.size, node.etag, node.mtime = staged.size, etag, staged.mtime
        parent, _, name = staged.path.rpartition("/")
        self.listings.update(parent, name, ObjectInfo(staged.path, staged.size,
                                                      staged.mtime or time.time(), etag or ""))
        log.info("uploaded %s (%d bytes, from a staging file)", staged.path, staged.size)

    async def _staged_closed(self, staged: Staged, node: Node) -> None:
        """A handle is gone; after the last one, upload what changed and free the disk space.

        Temporary names stay staged (deferred) until a rename gives them a final name.
        """
        try:
            if staged.writers == 0 and staged.dirty and not staged.failed and self._sendable(staged):
                await self._send_staged(staged, node)
        except MinervaError:
            pass  # logged; close() already reported it, or this was a never-written file
        if staged.opens == 0 and (self.staged.get(staged.path) is not staged or not staged.temporary
                                  or staged.failed):
            if self.staged.get(staged.path) is staged:
                del self.staged[staged.path]
            staged.close()
        self._maybe_idle()

    async def _publish(self, handle: Handle) -> None:
        upload = handle.upload
        if upload.finished:
            return
        etag = await upload.finish()
        node = handle.node
        node.size, node.etag, node.mtime = upload.size, etag, upload.mtime
        self.mtimes[upload.path] = (etag, upload.mtime)
        self._drop_pending(upload)
        info = ObjectInfo(node.path, node.size, node.mtime or time.time(), etag or "")
        self.listings.update(node.parent_path, node.name, info)
        self.completed += 1
        log.info("uploaded %s (%d bytes)", upload.path, upload.size)

    async def unlink(self, parent_inode: int, name: bytes) -> None:
        path, entry = await self._child(parent_inode, name)
        require_changeable(path, "unlink")
        if entry is DIR:
            raise IsADirectory(path)
        if path in self.pending:
            raise Busy(f"{path} is being written")
        staged = self.staged.pop(path, None)
        if staged is not None:
            if staged.opens == 0:
                staged.close()
            self._maybe_idle()
            if staged.base is None and staged.temporary:  # never reached S3
                self.inodes.removed(path)
                return
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
        if target is not False and flags & RENAME_NOREPLACE:
            raise Exists(dst)
        if entry is DIR:
            await self._rename_dir(src, dst, target)
        else:
            await self._rename_file(src, dst, target)
        self._forget_listing(self._dir(old_parent).path)
        self._forget_listing(self._dir(new_parent).path)
        self.inodes.moved(src, dst)

    async def _rename_file(self, src: str, dst: str, target) -> None:
        if target is DIR:
            raise IsADirectory(dst)
        upload = self.pending.get(src)
        if upload is not None:
            if not upload.renameable:
                raise Busy(f"{src} is being uploaded; rename it after it is closed")
            upload.path = dst
            self.pending[dst] = self.pending.pop(src)
            return
        old = self.staged.pop(dst, None)  # a file replaced before it was sent
        if old is not None and old.opens == 0:
            old.close()
        staged = self.staged.get(src)
        if staged is not None:
            await self._rename_staged(staged, src, dst)
            return
        node = self.inodes.find(src)
        size = node.size if node is not None else None
        etag = await self.store.copy(self._key(src), dst, size)  # the new name is visible before the old goes
        await self.store.delete(self._key(src))
        known = self.mtimes.pop(src, None)
        if known is not None and etag:
            self.mtimes[dst] = (etag, known[1])

    async def _rename_staged(self, staged: Staged, src: str, dst: str) -> None:
        """A file held locally takes its new name locally; a final name gets it sent now."""
        if staged.uploading:
            raise Busy(f"{src} is being uploaded; rename it after it is closed")
        if staged.base is not None:
            # The object under the old name goes: keep its bytes locally first.
            size = staged.base.size
            await staged.fill_all()
            await self.store.copy(src, dst, size)
            await self.store.delete(src)
            self.mtimes.pop(src, None)
        staged.path = dst
        self.staged[dst] = self.staged.pop(src)
        if staged.opens > 0 or not self._sendable(staged):
            return  # sent at its last close, or kept back while the name is temporary
        try:
            if staged.dirty:
                await self._send_staged(staged, Node(0, dst, False))
        except MinervaError:
            staged.path, staged.failed = src, False  # keep it, under its old name, for a retry
            self.staged[src] = self.staged.pop(dst)
            raise
        del self.staged[dst]
        staged.close()
        self._maybe_idle()

    async def _rename_dir(self, src: str, dst: str, target) -> None:
        if target is not False and target is not DIR:
            raise NotADirectory(dst)
        if target is DIR and await self.store.has_children(dst + "/"):
            raise NotEmpty(dst)
        if any(p.startswith(src + "/") for p in [*self.pending, *self.staged]):
            raise Busy(f"{src} holds files being written")
        objects = await self.store.list_tree(src + "/")
        limiter = trio.CapacityLimiter(MAX_COPIES)
        errors: list[MinervaError] = []

        async def bounded(fn, *args):
            async with limiter:
                if not errors:
                    try:
                        await fn(*args)
                    except MinervaError as exc:
                        errors.append(exc)

        async def move(info: ObjectInfo) -> None:
            if info.path.endswith("/"):  # a folder marker: empty, made anew
                await self.store.put(dst + info.path[len(src):], b"", {})
            else:
                await self.store.copy(info.path, dst + info.path[len(src):], info.size)

        # Every copy completes before the first delete: the new names show before old ones go.
        async with trio.open_nursery() as nursery:
            for info in objects:
                nursery.start_soon(bounded, move, info)
        if errors:
            raise errors[0]
        if not objects:
            await self.store.put(dst + "/", b"", {})
        async with trio.open_nursery() as nursery:
            for info in objects:
                nursery.start_soon(bounded, self.store.delete, info.path)
        if errors:
            raise errors[0]
        for path in [p for p in self.listings if p == src or p.startswith(src + "/")]:
            self._forget_listing(path)

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
        """Wait until no file is open for writing (all closed and uploaded), up to `timeout`.

        Returns the paths still unfinished.
        """
        with trio.move_on_after(timeout):
            await self._idle.wait()
        return sorted(self.pending)


def mode_of(node: Node) -> int:
    return (stat.S_IFDIR | 0o755) if node.is_dir else (stat.S_IFREG | 0o644)
