"""The file system without the kernel: what each operation means for the storage area.

The FUSE adapter calls these methods with inode numbers and raw names; tests call them the
same way with a FakeStore. Every failure is a MinervaError carrying its errno.

Folder listings are cached for `listing_ttl` seconds and answer lookups, so `ls -l` costs one
LIST per 1,000 entries and no HEAD per file. Files held locally (being written, staged, kept
back under a temporary name) belong to localfiles.py and are shown on top of the listing.
"""

import contextlib
import logging
import stat
import time

import cachetools
import trio

from .errors import (
    Exists,
    InvalidName,
    MinervaError,
    NameTooLong,
    NotADirectory,
    NotEmpty,
    NotFound,
)
from .fileops import FileOps
from .handles import Handle
from .listings import DIR, GONE, MISSING, ListingCache
from .localfiles import UNSENT, LocalFiles, State
from .namespace import (
    INCOMING,
    MAX_KEY_BYTES,
    OUTGOING,
    InodeTable,
    Node,
    check_name,
    join,
    require_changeable,
    require_writable,
)
from .reader import Blocks
from .renames import Renames
from .shown import convert_listing
from .staging import Staged, StagingArea, check_size
from .store import ObjectInfo
from .writer import NotSequential

log = logging.getLogger("minerva.core")

SNAPSHOT_ENTRIES = 200_000  # folder entries kept for reuse by the next opendir


class Core(FileOps, Renames):
    def __init__(self, store, nursery: trio.Nursery, *, listing_ttl: float = 1.0, cache=None,
                 staging: StagingArea | None = None, mountpoint: str | None = None, still_open=None,
                 writeback=None):
        self.store = store
        self.nursery = nursery
        self.blocks = Blocks(store, nursery, cache)
        self.staging = staging or StagingArea.private_temporary()  # tests; the daemon passes one
        self.page_cache_etags: dict[int, str] = {}  # inode -> ETag the kernel's pages hold
        self.on_changed = None  # callback(inode): drop the kernel's pages of a changed object
        self.inodes = InodeTable()
        self.handles: dict[int, Handle] = {}
        self.files = LocalFiles(nursery, self._published, writeback, on_gone=self._held_gone)
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
        path = join(dir_path, name)
        held = self.files.get(path)
        if held is not None:
            return held.entry()
        if self.files.marker(path) is not None:
            return DIR  # made here with write-back, its marker not in S3 yet
        if dir_path == "" and name in (INCOMING, OUTGOING):
            return DIR  # always there: resolvable while S3 or the credentials are not
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
        for name in self.files.folders_in(dir_path):
            result[name] = DIR
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
        parent = self._dir(parent_inode).path
        if parent not in self.listings:  # (a cold folder only: this is every lookup's path)
            with contextlib.suppress(InvalidName):  # _child answers it
                self.listings.list_ahead(parent, check_name(name), self.nursery)
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
        f = self.files.get(node.path)
        if f is not None:
            node.size, node.mtime = f.size, f.mtime or node.mtime
        if mtime is not None:
            if f is not None and f.state in UNSENT:
                f.mtime = mtime
            elif node.etag:
                # Already uploaded: shown from memory, not persisted (a copy would re-publish it).
                self.mtimes[node.path] = (node.etag, mtime)
            node.mtime = mtime
        return node

    async def _truncate(self, node: Node, size: int) -> None:
        check_size(node.path, size)
        f = self._changeable(node.path)
        in_s3 = None  # the object S3 holds with the file's content: a refusal goes back to it
        if f is not None and f.state is State.PUBLISHED and not f.dirty and f.writers == 0:
            if f.staged is not None:
                in_s3 = f.staged.base  # (its readers keep reading it, live)
            else:
                self.files.detach(f)  # a stream's: start from S3, so a refusal is undone
                f = None
        made = f is None  # a copy made for this truncate alone
        if made:
            if size == node.size:
                return
            require_writable(node.path, "truncate")
            f = await self._hold(node, keep=True)
        before = (f.size, f.state, f.dirty, f.created_empty)
        try:
            await self.files.before_change(f)
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
        except MinervaError:
            if made:  # a refused truncate changes nothing: the copy made for it goes
                self.files.discard(f)
            elif in_s3 is not None and f.writers == 0:
                await f.staged.reset(in_s3)
                self.files.restore(f, *before[1:])
                node.size = f.size
            elif f.staged is not None and f.size > before[0] and f.writers == 0:
                await f.staged.truncate(before[0])  # a growth is undone (a shrink cannot be)
                self.files.restore(f, *before[1:])
            raise

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
        if self.files.writeback is not None:  # the marker goes up in the background
            await self.files.folder_made(path, Staged(self.store, self.staging, path + "/"))
        else:
            await self.store.put(path + "/", b"", {})
        self.listings.update(self._dir(parent_inode).path, check_name(name), DIR)
        node = self.inodes.upsert(path, True, mtime=time.time())
        self.listings.created(path)
        node.lookups += 1
        return node

    async def rmdir(self, parent_inode: int, name: bytes) -> None:
        path, entry = await self._child(parent_inode, name)
        require_changeable(path, "rmdir")
        if entry is not DIR:
            raise NotADirectory(path)
        marker = self.files.marker(path)  # write-back: made here, its marker maybe not sent yet
        async with self.files.changing(marker) if marker is not None else contextlib.nullcontext():
            held = self.files.inside(path)
            if held or await self.store.has_children(path + "/"):
                if held:
                    log.info("rmdir %s: not empty (%s is held here, %s)", path, held[0].path,
                             held[0].state.value)
                raise NotEmpty(path)
            await self.store.delete(path + "/")  # (the marker may be in S3 or on its way)
            if marker is not None:
                self.files.detach(marker)  # never sent now
        self.listings.update(self._dir(parent_inode).path, check_name(name), GONE)
        self.listings.forget(path)
        self.inodes.removed(path)

    def _held_gone(self, f) -> None:
        """A held file left localfiles' table: its node and the folder's last snapshot showed
        the local content; from now on they show what S3's listing says."""
        parent, _, name = f.path.rstrip("/").rpartition("/")  # (a folder's marker: the folder)
        self._snapshots.pop(parent, None)
        node, listing = self.inodes.find(f.path), self.listings.get(parent)
        entry = listing.get(name, MISSING) if listing is not None else MISSING
        if node is not None and entry is not MISSING and entry is not DIR:
            node.size, node.mtime, node.etag = entry.size, entry.mtime, entry.etag or None

    async def warm(self) -> None:
        """At mount start: list the root, so the first lookups and a file manager's probes
        there (`.Trash`, `.hidden`) cost no round trip while the user waits; Incoming/ and
        Outgoing/ resolve without it (see `_entry`). A second LIST of it at the same time
        leaves a second connection open: a cold path walk lists two folders at once
        (listings.list_ahead), and a connection opened then costs its handshake (a round trip,
        two with TLS) on the way to the first byte: 0.21 s instead of 0.15 at 40 ms RTT."""
        async def second_connection() -> None:
            with contextlib.suppress(MinervaError):
                await self.store.list_dir_page("")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(second_connection)
            try:
                await self._listing("")
            except MinervaError as exc:
                log.warning("could not list the mount root at start: %s", exc)

    def restore_spooled(self, journal, fd: int) -> None:
        """Write-back: a file an earlier run left in the spool is held (and shown) again."""
        staged = Staged.restored(self.store, self.staging, journal.key, fd, journal.size, journal.mtime)
        self.files.restored(journal.key, staged, journal)

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
