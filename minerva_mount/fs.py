"""The pyfuse3 adapter: translate kernel requests to Core calls, and errors to errnos.

Kept thin on purpose. The one rule it enforces for every handler: only FUSEError may leave,
since any other exception kills the session and hangs the mount. A MinervaError becomes its
errno; anything else is a bug, logged with its traceback and answered with EIO.
"""

import errno
import functools
import logging
import os
import threading

import pyfuse3
import trio

from . import xattrs
from .core import Core, mode_of
from .errors import MinervaError, NotFound
from .listings import Change
from .namespace import Node

log = logging.getLogger("minerva.fs")



def _handler(method):
    @functools.wraps(method)
    async def wrapper(self, *args, **kwargs):
        try:
            return await method(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except MinervaError as exc:
            if exc.errno == errno.EIO:
                log.error("%s failed: %s", method.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception:
            log.exception("unexpected error in %s", method.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, core: Core):
        super().__init__()
        self.core = core
        self.uid, self.gid = os.getuid(), os.getgid()
        self._notify_lock = threading.Lock()
        self._notifying = True
        self._attrs: dict[int, tuple] = {}  # inode -> ((size, mtime, is_dir), EntryAttributes)
        # An object changed under pages the kernel keeps (FOPEN_KEEP_CACHE): drop them too.
        core.on_changed = lambda inode: core.listings.report(Change("changed", 0, "", inode))

    def _attr(self, node: Node) -> pyfuse3.EntryAttributes:
        """The node's attributes, built once per (size, mtime, type): `ls -l` of a folder asks for
        every entry's on each listing, and pyfuse3 copies them into each reply."""
        key = (node.size, node.mtime, node.is_dir)
        cached = self._attrs.get(node.inode)
        if cached is not None and cached[0] == key:
            return cached[1]
        attr = self._attrs[node.inode] = key, self._new_attr(node)
        return attr[1]

    def _new_attr(self, node: Node) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.inode
        attr.st_mode = mode_of(node)
        attr.st_nlink = 2 if node.is_dir else 1
        attr.st_size = node.size
        attr.st_uid, attr.st_gid = self.uid, self.gid
        attr.st_blksize = 1 << 20
        attr.st_blocks = (node.size + 511) // 512
        ns = int(node.mtime * 1e9)
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = ns
        # The kernel keeps entries as long as the listing cache does; changes made elsewhere
        # are pushed to it by notify_kernel. The root's attributes cost nothing to ask for, and
        # a stat of the mount point must soon tell a dead mount (ENOTCONN).
        attr.entry_timeout = attr.attr_timeout = self.core.listings.ttl
        if node.inode == pyfuse3.ROOT_INODE:
            attr.attr_timeout = 1.0
        return attr

    @_handler
    async def lookup(self, parent_inode, name, ctx):
        try:
            return self._attr(await self.core.lookup(parent_inode, name))
        except NotFound:
            absent = pyfuse3.EntryAttributes()  # st_ino 0: the kernel caches "no such file"
            absent.entry_timeout = self.core.listings.ttl
            return absent

    async def notify_kernel(self) -> None:
        """Tell the kernel what changed in S3 (a background task of the daemon's nursery).

        Each call runs in a thread: the kernel may make it wait for a request on the same
        folder or file, which this event loop must stay free to answer.
        """
        async for change in self.core.listings.changes:
            await trio.to_thread.run_sync(self._invalidate, change, abandon_on_cancel=True)

    def _invalidate(self, change) -> None:
        with self._notify_lock:
            if not self._notifying:
                return
            try:
                if change.kind == "changed":
                    pyfuse3.invalidate_inode(change.inode)
                else:
                    deleted = change.inode if change.kind == "removed" else 0
                    pyfuse3.invalidate_entry(change.parent_inode, change.name.encode(), deleted)
            except OSError as exc:
                if exc.errno != errno.ENOENT:  # ENOENT: the kernel held nothing to invalidate
                    log.warning("could not invalidate %s in the kernel: %s", change, exc)

    def stop_notifying(self, timeout: float = 5.0) -> None:
        """Called before pyfuse3.close: no invalidation may reach a closed session."""
        locked = self._notify_lock.acquire(timeout=timeout)
        self._notifying = False
        if locked:
            self._notify_lock.release()

    async def forget(self, inode_list):
        for inode, count in inode_list:
            self.core.forget(inode, count)
            if inode not in self.core.inodes.by_inode:
                self._attrs.pop(inode, None)

    @_handler
    async def getattr(self, inode, ctx):
        return self._attr(await self.core.getattr(inode))

    @_handler
    async def setattr(self, inode, attr, fields, fh, ctx):
        mtime = attr.st_mtime_ns / 1e9 if fields.update_mtime else None
        size = attr.st_size if fields.update_size else None
        return self._attr(await self.core.setattr(inode, size=size, mtime=mtime))

    @_handler
    async def opendir(self, inode, ctx):
        return await self.core.opendir(inode)

    @_handler
    async def readdir(self, fh, start_id, token):
        for index, (name, node) in enumerate(self.core.readdir(fh, start_id), start_id + 1):
            if not pyfuse3.readdir_reply(token, name.encode(), self._attr(node), index):
                break
            self.core.remember(node)

    @_handler
    async def releasedir(self, fh):
        self.core.releasedir(fh)

    @_handler
    async def mkdir(self, parent_inode, name, mode, ctx):
        return self._attr(await self.core.mkdir(parent_inode, name))

    @_handler
    async def rmdir(self, parent_inode, name, ctx):
        await self.core.rmdir(parent_inode, name)

    @_handler
    async def unlink(self, parent_inode, name, ctx):
        await self.core.unlink(parent_inode, name)

    @_handler
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        await self.core.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @_handler
    async def open(self, inode, flags, ctx):
        fh = await self.core.open(inode, flags, pid=ctx.pid)
        handle = self.core.handles[fh]
        return pyfuse3.FileInfo(fh=fh, keep_cache=handle.keep_cache, direct_io=handle.direct_io)

    @_handler
    async def create(self, parent_inode, name, mode, flags, ctx):
        fh, node = await self.core.create(parent_inode, name, flags, pid=ctx.pid)
        return pyfuse3.FileInfo(fh=fh), self._attr(node)

    @_handler
    async def read(self, fh, off, size):
        return await self.core.read(fh, off, size)

    @_handler
    async def write(self, fh, off, buf):
        return await self.core.write(fh, off, buf)

    @_handler
    async def flush(self, fh):
        await self.core.flush(fh)

    @_handler
    async def fsync(self, fh, datasync):
        pass  # data reaches S3 at close; an fsync before that has nothing durable to offer

    @_handler
    async def release(self, fh):
        await self.core.release(fh)

    @_handler
    async def statfs(self, ctx):
        stats = pyfuse3.StatvfsData()
        for name, value in self.core.statfs().items():
            setattr(stats, name, value)
        return stats

    @_handler
    async def getxattr(self, inode, name, ctx):
        return xattrs.get(self.core, inode, name)

    @_handler
    async def listxattr(self, inode, ctx):
        return xattrs.names(self.core, inode)

    @_handler
    async def setxattr(self, inode, name, value, ctx):
        xattrs.set_(name)

    @_handler
    async def removexattr(self, inode, name, ctx):
        xattrs.remove(name)

    async def symlink(self, parent_inode, name, target, ctx):
        log.warning("refused symlink %r: S3 has no links", name)
        raise pyfuse3.FUSEError(errno.EPERM)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        log.warning("refused hard link %r: S3 has no links", new_name)
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        log.warning("refused mknod %r: only regular files and folders exist here", name)
        raise pyfuse3.FUSEError(errno.EPERM)
