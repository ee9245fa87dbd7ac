"""Folder listings: a TTL cache that answers lookups, and a refresher for folders in use.

A cached listing is complete, so it answers every lookup in its folder, including of names
that are absent (the probes file managers make for .hidden, autorun.inf, .Trash-UID), with no
request. `ls -l` of a folder of N objects thus costs ceil(N / 1000) LIST and no HEAD, and a
second one within the TTL costs nothing.

Changes made elsewhere (a pipeline writing exports into Outgoing/) reach the mount because
folders in use (an open directory handle, or listed within `watch_window`) are re-listed every
`refresh_interval` by `refresh_loop`. Every new listing is compared with the one before it,
and what the kernel may hold in its caches is reported as a `Change` on the bounded channel
`changes`; the FUSE adapter turns those into kernel invalidations. Only what the kernel can
hold is reported: nodes it knows (removed or changed) and names it was told are absent.
"""

import contextlib
import logging
import time
from dataclasses import dataclass

import cachetools
import trio

from .errors import MinervaError, StoreError
from .namespace import INCOMING, OUTGOING, InodeTable, join, shown_name
from .store import ObjectInfo

log = logging.getLogger("minerva.listings")

DIR = None  # a listing entry that is a folder
GONE = object()  # for `update`: the name was removed
MISSING = False  # no such name in the folder (a lookup answer; DIR, None, is a folder)
Entries = dict[str, ObjectInfo | None]


@dataclass(frozen=True)
class Change:
    """Something the kernel may have cached that is no longer true."""

    kind: str  # "added" (was absent), "removed", or "changed" (new content or type)
    parent_inode: int
    name: str
    inode: int = 0  # the node the kernel may hold under `name` (0: none)


def plain_entries(dir_path: str, listing) -> Entries:
    """One folder level from S3 as name -> ObjectInfo, or DIR for a sub-folder."""
    entries: Entries = {}
    for sub in listing.dirs:
        name = sub.rstrip("/")
        if shown_name(name):
            entries[name] = DIR
    for info in listing.files:
        name = info.path.rsplit("/", 1)[-1]
        if not shown_name(name) or name in entries:
            log.info("not shown: object %r (name unusable or taken by a folder)", info.path)
            continue
        entries[name] = info
    if dir_path == "":
        entries.setdefault(INCOMING, DIR)
        entries.setdefault(OUTGOING, DIR)
    return entries


class _Fetch:
    """A LIST in flight; later askers for the same folder wait for it instead of listing again.

    `stale` is set when the folder changes through the mount meanwhile: the result may
    predate the change, so it is neither cached nor joined.
    """

    def __init__(self):
        self.done = trio.Event()
        self.entries: Entries | None = None
        self.error: MinervaError | None = None
        self.stale = False


class ListingCache(cachetools.TTLCache):
    """dir path -> complete listing, fresh for `ttl` seconds."""

    def __init__(self, store, inodes: InodeTable, pending: dict, ttl: float, maxsize: int = 512,
                 watch_max: int = 64, watch_window: float = 600.0, channel_size: int = 4096,
                 convert=plain_entries):
        super().__init__(maxsize=maxsize, ttl=ttl)
        self._store = store
        self._convert = convert  # (dir_path, Listing) -> Entries: the names the folder shows
        self._inodes = inodes
        self._pending = pending  # paths being written: their size is the writer's, not S3's
        self._inflight: dict[str, _Fetch] = {}
        self._known: cachetools.LRUCache = cachetools.LRUCache(maxsize)  # last listing seen
        self._listed_at: cachetools.LRUCache = cachetools.LRUCache(maxsize)
        self._recent: cachetools.TTLCache = cachetools.TTLCache(watch_max, watch_window)
        self._open: dict[int, str] = {}  # directory handle -> folder
        self._absent: cachetools.TTLCache = cachetools.TTLCache(channel_size, ttl)  # negative entries
        self._send, self.changes = trio.open_memory_channel[Change](channel_size)
        self.version = 0  # bumped by every change to a cached listing (lets the core reuse work)

    # ----- what the core calls ----------------------------------------------------------

    async def fetch(self, dir_path: str) -> Entries:
        """List `dir_path` in S3 (one LIST in flight per folder), cache it, report changes."""
        fetch = self._inflight.get(dir_path)
        if fetch is not None and not fetch.stale:
            await fetch.done.wait()
            if fetch.error is not None:
                raise fetch.error
            return fetch.entries
        fetch = self._inflight[dir_path] = _Fetch()
        try:
            listing = await self._store.list_dir(dir_path + "/" if dir_path else "")
            fetch.entries = self._convert(dir_path, listing)
        except MinervaError as exc:
            fetch.error = exc
            raise
        except BaseException:
            fetch.error = StoreError(f"listing {dir_path or '/'} was interrupted")
            raise
        finally:
            fetch.done.set()
            if self._inflight.get(dir_path) is fetch:
                del self._inflight[dir_path]
        if not fetch.stale:
            self._store_listing(dir_path, fetch.entries)
        return fetch.entries

    def forget(self, dir_path: str) -> None:
        """The folder changed through the mount: the next use lists it again."""
        self.version += 1
        self.pop(dir_path, None)
        if (fetch := self._inflight.get(dir_path)) is not None:
            fetch.stale = True

    def update(self, dir_path: str, name: str, entry) -> None:
        """A change made through the mount: patch the cached listing rather than list again.

        `entry` is the new ObjectInfo, DIR, or GONE. Copying or deleting N files thus costs
        no LIST per file. A LIST in flight may predate the change, so it is not cached.
        """
        if (fetch := self._inflight.get(dir_path)) is not None:
            fetch.stale = True
        self.version += 1
        entries = self.get(dir_path)  # patched in place: its age (TTL) stays that of the LIST
        if entries is None:
            return
        if entry is GONE:
            entries.pop(name, None)
        else:
            entries[name] = entry

    def clear(self) -> None:
        self.version += 1
        for fetch in self._inflight.values():
            fetch.stale = True
        super().clear()

    def absent(self, dir_path: str, name: str) -> None:
        """The kernel was told `name` does not exist (a negative entry it may cache)."""
        self._absent[(dir_path, name)] = True

    def vanished(self, path: str, inode: int) -> None:
        """A name the kernel holds is gone without a change to the listing (an upload that
        never completed): tell the kernel, or it would keep the name for the TTL."""
        dir_path, _, name = path.rpartition("/")
        parent = self._inodes.find(dir_path)
        if parent is not None:
            with contextlib.suppress(trio.WouldBlock):
                self._send.send_nowait(Change("removed", parent.inode, name, inode))

    def opened(self, fh: int, dir_path: str) -> None:
        self._open[fh] = dir_path
        self._recent[dir_path] = True

    def closed(self, fh: int) -> None:
        self._open.pop(fh, None)

    # ----- keeping folders in use fresh ---------------------------------------------------

    def watched(self) -> list[str]:
        """Folders in use: open now, or listed within the watch window (bounded)."""
        return sorted(set(self._recent.keys()) | set(self._open.values()))

    async def refresh_once(self, min_age: float = 0.0) -> int:
        """Re-list every folder in use last listed at least `min_age` seconds ago."""
        count = 0
        for dir_path in self.watched():
            listed = self._listed_at.get(dir_path)
            if listed is not None and time.monotonic() - listed < min_age:
                continue
            try:
                await self.fetch(dir_path)
                count += 1
            except MinervaError as exc:
                log.warning("could not re-list %s: %s", dir_path or "/", exc)
        return count

    async def refresh_loop(self, interval: float) -> None:
        """Re-list folders in use so that changes made elsewhere show within `interval`."""
        interval = max(interval, 0.2)
        tick = interval / 4
        while True:
            await trio.sleep(tick)
            await self.refresh_once(interval - tick)

    # ----- comparing listings ---------------------------------------------------------------

    def _store_listing(self, dir_path: str, entries: Entries) -> None:
        before = self._known.get(dir_path)
        self.version += 1
        self[dir_path] = entries
        self._known[dir_path] = entries
        self._listed_at[dir_path] = time.monotonic()
        parent = self._inodes.find(dir_path)
        if parent is None or not parent.is_dir:
            return  # the kernel holds nothing below a folder it does not know
        for change in list(self._diff(dir_path, parent.inode, before, entries)):
            if not self.report(change):
                return

    def report(self, change: Change) -> bool:
        """Queue `change` for the kernel; False when the bounded channel is full."""
        try:
            self._send.send_nowait(change)
            return True
        except trio.WouldBlock:
            log.warning("too many changes at once (%s %s): the kernel sees the rest after its "
                        "cache timeout", change.kind, change.name or change.inode)
            return False

    def _diff(self, dir_path: str, parent_inode: int, before: Entries | None, after: Entries):
        for key in [k for k in self._absent if k[0] == dir_path and k[1] in after]:
            self._absent.pop(key, None)
            yield Change("added", parent_inode, key[1])
        for name in (before or {}).keys() - after.keys():
            node = self._inodes.find(join(dir_path, name))
            if node is not None and node.path not in self._pending:
                self._inodes.removed(node.path)
                yield Change("removed", parent_inode, name, node.inode)
        for name, info in after.items():
            path = join(dir_path, name)
            node = self._inodes.find(path)
            if node is None or path in self._pending:
                continue
            if node.is_dir != (info is DIR):
                self._inodes.removed(path)
                yield Change("removed", parent_inode, name, node.inode)
            elif info is not DIR and (info.size != node.size or (node.etag or info.etag) != info.etag):
                self._inodes.upsert(path, False, info.size, info.mtime, info.etag or None)
                yield Change("changed", parent_inode, name, node.inode)
