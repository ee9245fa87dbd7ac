"""unlink and rename: how a name leaves or changes, for objects, held files and folders.

Part of Core (a mixin). Every change of a held file is ordered after a publish under way
(`LocalFiles.settle`), so a rename or unlink during a publish is applied to its result and
never lost. S3 has no rename: a file is copied, then the original deleted, so the new name
is visible before the old one goes; a held file takes its new name locally and is sent once,
under the final name. A file renamed TO a temporary name leaves S3 and is held here.
"""

import contextlib
import errno
import logging

from .errors import (
    Exists,
    IsADirectory,
    MinervaError,
    NotADirectory,
    NotEmpty,
    NotPermitted,
    busy,
)
from .foldermove import check_keys, move_tree
from .listings import DIR, GONE, MISSING
from .localfiles import UNSENT, LocalFile, State
from .namespace import (
    Area,
    area_of,
    check_name,
    is_marker,
    is_temporary,
    require_changeable,
)
from .store import ObjectInfo

log = logging.getLogger("minerva.core")

HOLD_ROUNDS = 64  # waits for files under a folder being renamed to settle, then EBUSY

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


class Renames:
    """Core's unlink and rename (Core inherits this; see the module docstring)."""

    async def unlink(self, parent_inode: int, name: bytes) -> None:
        path, entry = await self._child(parent_inode, name)
        require_changeable(path, "unlink")
        if entry is DIR:
            raise IsADirectory(path)
        f = self.files.get(path)
        if f is not None:
            await self.files.settle(f)  # a publish under way completes first, then goes
            f = self.files.get(path)
        # (No upload of it starts meanwhile: it would bring the name back.)
        async with self.files.changing(f) if f is not None else contextlib.nullcontext():
            if f is not None and f.opens and f.staged is not None and f.in_s3 is not None:
                await f.staged.fill_all()  # its handles keep working once the object is gone
            if self._key(path) != path or await self._in_s3(path):
                await self.store.delete(self._key(path))  # first: a refused unlink changes nothing
            if f is not None and self.files.get(path) is f:
                self.files.detach(f)
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
        try:
            if entry is DIR:
                await self._rename_dir(src, dst, target)
            else:
                await self._rename_file(src, dst, target)
        finally:  # also after a failure: what it did (copies made) shows at once
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
        if f is not None and (f.state in UNSENT or f.spooled is not None):
            # (A write-back upload failed for good is in the spool alone: renamed there.)
            await self._rename_held(f, src, dst)
            return
        if area_of(dst) is Area.INCOMING and is_temporary(dst) and self._key(src) == src:
            # Renamed TO a temporary name: it leaves S3 and is held here until renamed back.
            node = self.inodes.find(src) or self.inodes.upsert(src, False)
            held = self._changeable(src)
            f = held or await self._hold(node, keep=True)
            try:
                await f.staged.fill_all()
                await self.store.delete(src)
            except MinervaError:
                if held is None:  # a refused rename changes nothing
                    self.files.discard(f)
                raise
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
        if f.upload is not None and is_temporary(dst):
            await self._restage(f)  # kept back under the temporary name: its bytes go to disk
        replaced = self.files.get(dst)
        if replaced is f:
            replaced = None
        if replaced is not None:  # replaced only once the rename is done: a refusal puts it back (M33)
            self.files.set_aside(replaced)
        try:
            async with self.files.changing(f):  # no upload starts under the old name meanwhile
                left_s3 = await self._move_held(f, src, dst)
            if left_s3:
                self.files.unsent(f)  # held under the temporary name even if unchanged
            if f.writers == 0 and f.state in (State.KEPT_BACK, State.STAGED) and not is_temporary(dst):
                try:
                    await self.files.publish(f)
                except MinervaError:
                    if self.files.get(dst) is f:  # keep it, under its old name, for a retry
                        self.files.renamed(f, src)
                        self.files.restore(f, State.KEPT_BACK, True, f.created_empty)
                    raise
        except BaseException:
            if replaced is not None and self.files.get(dst) is None:
                self.files.put_back(replaced)
            raise
        if replaced is not None:
            self.files.detach(replaced)

    async def _move_held(self, f: LocalFile, src: str, dst: str) -> bool:
        """S3 loses the old name (its object copied to `dst` if the content still comes from
        it); the held file takes the new one. Whether the content's object went with none
        taking the new name."""
        base = f.in_s3
        left_s3 = False  # the content's object goes and none takes the new name
        if base is not None and base.path == src:
            if is_temporary(dst) or (f.dirty and f.writers == 0):
                # The object goes; its bytes stay here. (A changed file goes up under `dst`
                # below, bringing them here anyway: a copy would show S3's old bytes under
                # the new name until then, for as long as a write-back upload takes.)
                await f.staged.fill_all()
                left_s3 = is_temporary(dst)
            else:
                etag = await self.store.copy(src, dst, base.size)
                f.staged.rebase(ObjectInfo(dst, base.size, base.mtime, etag))
        if await self._in_s3(src):
            await self.store.delete(src)
        self.files.renamed(f, dst)
        return left_s3

    async def _rename_dir(self, src: str, dst: str, target) -> None:
        if target is not MISSING and target is not DIR:
            raise NotADirectory(dst)
        if target is DIR and (self.files.inside(dst) or await self.store.has_children(dst + "/")):
            raise NotEmpty(dst)
        async with contextlib.AsyncExitStack() as stack:
            holding = await self._hold_still(src, stack)
            # Spooled files (write-back) move with their folder: the journal takes the new name.
            unsent = [f for f in holding if f.state in UNSENT and f.spooled is None]
            if unsent:
                raise busy(f"{src} holds {unsent[0].path}, not uploaded yet ({unsent[0].state.value}); "
                           "rename the folder once it is")
            objects = await self.store.list_tree(src + "/")
            # Markers of folders made here (write-back) not in S3 yet are sent with the copies,
            # so a rename that fails half way leaves the new folders whole, as S3's would be.
            markers = [ObjectInfo(f.path, 0, 0.0, "") for f in holding if is_marker(f.path)]
            check_keys(src, dst, objects + [ObjectInfo(f.path, 0, 0.0, "") for f in holding])
            # A spooled file's object is superseded by the spool's version, which goes up under
            # the new name: deleted, not copied (S3 never shows its old bytes there).
            superseded = {f.path for f in holding if f.spooled is not None}
            try:
                for info in objects:
                    if info.path in superseded:
                        await self.store.delete(info.path)
                await move_tree(self.store, src, dst,
                                [o for o in objects if o.path not in superseded] + markers)
            finally:  # also after a failure: the copies it made show at once
                for path in [p for p in self.listings
                             if p in (src, dst) or p.startswith(src + "/") or p.startswith(dst + "/")]:
                    self.listings.forget(path)
            for f in holding:
                if is_marker(f.path):
                    self.files.detach(f)  # in S3 under the new name now
                else:  # still open, or spooled: on under the new name
                    self.files.renamed(f, dst + f.path[len(src):])

    async def _hold_still(self, src: str, stack: contextlib.AsyncExitStack) -> list[LocalFile]:
        """Every file held under `src`, each settled and held still (`changing`: no upload
        starts) until `stack` closes. Taken before S3 is listed: an upload ending between
        the LIST and the move left its object out of the listing and its file out of the
        table, so it moved with neither (WB11: `cp -r` into a new folder, then `mv` of it as
        the copy's uploads began).

        Nothing is held while anything is waited for: all are settled first, then all taken
        at one instant (taking a settled file has no checkpoint). Holding one while waiting
        for the next let another rename move a held file out of the folder first (WB16), and
        deadlocked with a close in the folder waiting for spool room that only the held
        file's upload could make (WB17). Files saved again and again (or a copy going on in
        the folder) may never all be settled at once: after HOLD_ROUNDS waits, EBUSY (WB20);
        the tail of a write-back copy of 1,000 small files (16 uploads at once) takes ~63."""
        for _ in range(HOLD_ROUNDS):
            for f in self.files.under(src):
                await self.files.settle(f)
            files = self.files.under(src)
            if all(f.settled.is_set() for f in files):
                for f in files:
                    await stack.enter_async_context(self.files.changing(f))
                return files
        busy_now = [f.path for f in self.files.under(src) if not f.settled.is_set()]
        raise busy(f"{src}: files under it keep being uploaded or saved ({busy_now[:1]}); rename "
                   "the folder once they are done")

