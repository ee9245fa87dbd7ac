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
from dataclasses import dataclass

import trio

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
from .reader import Reader
from .store import ObjectInfo
from .writer import Upload

log = logging.getLogger("minerva.core")

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


class Busy(MinervaError):
    errno = errno.EBUSY


class NotSupported(MinervaError):
    errno = errno.EOPNOTSUPP


@dataclass
class Handle:
    node: Node
    reader: Reader | None = None
    upload: Upload | None = None


class Core:
    def __init__(self, store, nursery: trio.Nursery, *, listing_ttl: float = 1.0):
        self.store = store
        self.nursery = nursery
        self.inodes = InodeTable()
        self.handles: dict[int, Handle] = {}
        self.pending: dict[str, Upload] = {}
        self.completed = 0  # files uploaded since the mount started
        self.aliases: dict[str, str] = {}  # shown path -> object path, for shadowed files
        self.listings = ListingCache(store, self.inodes, self.pending, ttl=listing_ttl,
                                     convert=self._convert_listing)
        self._dir_snapshots: dict[int, list[tuple[str, Node]]] = {}
        self._next_fh = 1
        self._idle = trio.Event()  # set while no file is open for writing
        self._idle.set()

    # ----- names and listings ---------------------------------------------------------

    async def _entries(self, dir_path: str) -> dict[str, ObjectInfo | None]:
        entries = self.listings.get(dir_path)
        if entries is None:
            # Not cached if the folder changes while the LIST is under way: that answer may
            # predate the change (a file published meanwhile would vanish for a while).
            entries = await self.listings.fetch(dir_path)
        result = dict(entries)
        for path, upload in self.pending.items():
            parent, _, name = path.rpartition("/")
            if parent == dir_path:
                result[name] = ObjectInfo(path, upload.size, upload.mtime or time.time(), "")
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
                entries[name] = info
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
        return node

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
        entries = await self._entries(parent.path)
        if text not in entries:
            self.listings.absent(parent.path, text)
            raise NotFound(join(parent.path, text))
        return join(parent.path, text), entries[text]

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

    def remember(self, node: Node) -> None:
        """The kernel took a reference (readdirplus entry accepted)."""
        self.inodes.remember(node)

    async def getattr(self, inode: int) -> Node:
        node = self._node(inode)
        upload = self.pending.get(node.path)
        if upload is not None:
            node.size = upload.size
        return node

    async def setattr(self, inode: int, size: int | None = None, mtime: float | None = None) -> Node:
        """chmod/chown always succeed (not persisted); size and mtime apply to new files."""
        node = self._node(inode)
        upload = self.pending.get(node.path)
        if size is not None:
            if upload is not None:
                await upload.truncate(size)
                node.size = upload.size
            elif size != node.size:
                require_writable(node.path, "truncate")
                raise NotSupported(f"truncate of uploaded file {node.path} is not supported yet")
        if mtime is not None:
            if upload is not None:
                upload.mtime = mtime
            node.mtime = mtime
        return node

    # ----- folders ------------------------------------------------------------------

    async def opendir(self, inode: int) -> int:
        node = self._dir(inode)
        entries = await self._entries(node.path)
        fh = self._take_fh()
        self.listings.opened(fh, node.path)
        self._dir_snapshots[fh] = [
            (name, self._node_for(join(node.path, name), entry))
            for name, entry in sorted(entries.items())
        ]
        return fh

    def readdir(self, fh: int, start: int) -> list[tuple[str, Node]]:
        return self._dir_snapshots[fh][start:]

    def releasedir(self, fh: int) -> None:
        self._dir_snapshots.pop(fh, None)
        self.listings.closed(fh)

    async def mkdir(self, parent_inode: int, name: bytes) -> Node:
        path = self._new_path(parent_inode, name)
        require_changeable(path, "mkdir")
        if check_name(name) in await self._entries(self._dir(parent_inode).path):
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

    async def open(self, inode: int, flags: int) -> int:
        node = self._node(inode)
        if node.is_dir:
            raise IsADirectory(node.path)
        if flags & os.O_ACCMODE == os.O_RDONLY:
            if node.path in self.pending:
                raise Busy(f"{node.path} is being written; it can be read once closed")
            if node.parent_path not in self.listings or not node.etag:
                info = await self.store.head(self._key(node.path))
                node.size, node.mtime, node.etag = info.size, info.mtime, info.etag
            info = ObjectInfo(self._key(node.path), node.size, node.mtime, node.etag or "")
            return self._open_handle(Handle(node, reader=Reader(self.store, info)))
        require_writable(node.path, "write")
        if node.path in self.aliases:
            raise NotPermitted(f"{node.path} stands for {self._key(node.path)}, which only a folder "
                               "name can show: rename it to write it")
        if node.path in self.pending:
            raise Busy(f"{node.path} is already open for writing")
        if not flags & os.O_TRUNC:
            log.warning("refused: %s opened for writing without O_TRUNC (not supported yet)", node.path)
            raise NotSupported(f"{node.path}: changing an uploaded file in place is not supported yet")
        return self._start_upload(node)

    def _start_upload(self, node: Node) -> int:
        upload = Upload(self.store, node.path, self.nursery)
        self.pending[node.path] = upload
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        node.size = 0
        return self._open_handle(Handle(node, upload=upload))

    async def create(self, parent_inode: int, name: bytes, flags: int) -> tuple[int, Node]:
        path = self._new_path(parent_inode, name)
        require_writable(path, "create")
        entries = await self._entries(self._dir(parent_inode).path)
        existing = entries.get(check_name(name), False)
        if existing is DIR:
            raise IsADirectory(path)
        if existing is not False and flags & os.O_EXCL:
            raise Exists(path)
        if path in self.pending:
            raise Busy(f"{path} is already open for writing")
        node = self.inodes.upsert(path, False, 0, time.time())
        node.lookups += 1
        return self._start_upload(node), node

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self.handles[fh]
        if handle.reader is None:
            raise NotPermitted(f"{handle.node.path} was not opened for reading")
        return await handle.reader.read(offset, size)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        handle = self.handles[fh]
        if handle.upload is None:
            raise NotPermitted(f"{handle.node.path} was not opened for writing")
        written = await handle.upload.write(offset, data)
        handle.node.size = handle.upload.size
        return written

    async def flush(self, fh: int) -> None:
        """close(): the object is complete in S3 when this returns, or it raises (EIO).

        A flush before any write is skipped: programs such as dd dup2 a new file onto
        stdout and close the original first, so that flush is not the end of the file.
        """
        handle = self.handles[fh]
        if handle.upload is not None and handle.upload.written:
            await self._publish(handle)

    async def release(self, fh: int) -> None:
        """The last descriptor is gone: publish a file that was never written (touch)."""
        handle = self.handles.pop(fh)
        upload = handle.upload
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
        if not self.pending:
            self._idle.set()
        return True

    async def _publish(self, handle: Handle) -> None:
        upload = handle.upload
        if upload.finished:
            return
        etag = await upload.finish()
        node = handle.node
        node.size, node.etag, node.mtime = upload.size, etag, upload.mtime
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
        target = (await self._entries(self._dir(new_parent).path)).get(check_name(new_name), False)
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
        await self.store.copy(self._key(src), dst)  # the new name is visible before the old one goes
        await self.store.delete(self._key(src))

    async def _rename_dir(self, src: str, dst: str, target) -> None:
        if target is not False and target is not DIR:
            raise NotADirectory(dst)
        if target is DIR and await self.store.has_children(dst + "/"):
            raise NotEmpty(dst)
        if any(p.startswith(src + "/") for p in self.pending):
            raise Busy(f"{src} holds files being written")
        objects = await self.store.list_tree(src + "/")
        for info in objects:
            await self.store.copy(info.path, dst + info.path[len(src):])
        if not objects:
            await self.store.put(dst + "/", b"", {})
        for info in objects:
            await self.store.delete(info.path)
        for path in [p for p in self.listings if p == src or p.startswith(src + "/")]:
            self._forget_listing(path)

    # ----- whole file system --------------------------------------------------------

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
