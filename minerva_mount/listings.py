"""Folder listings: a TTL cache that answers lookups, and a refresher for folders in use.

A cached listing is complete, so it answers every lookup in its folder, including of names
that are absent (the probes file managers make for .hidden, autorun.inf, .Trash-UID), with no
request. `ls -l` of a folder of N objects thus costs ceil(N / 1000) LIST and no HEAD, and a
second one within the TTL costs nothing.

Changes made elsewhere (a pipeline writing exports into Outgoing/) reach the mount because
folders in use (an open directory handle, or opened within `watch_window`) are re-listed in
the background by `refresh_loop`. Every new listing is compared with the one before it, and
what the kernel may hold in its caches is reported as a `Change` on the bounded channel
`changes`; the FUSE adapter turns those into kernel invalidations. Only what the kernel can
hold is reported: nodes it knows (removed or changed) and names it was told are absent.

How often, and why (issue 12: far from the region every LIST is a WAN round trip, and a
folder of 100,000 objects moves ~25 MB per listing). Re-listing every folder in use every
`refresh_interval` cost 80 LISTs per folder per ten minutes, almost all finding nothing new.
Now a folder is re-listed `refresh_interval` (10 s) after its last listing, and each listing
that finds it unchanged doubles the wait, up to 30 s while it is open (OPEN_BOUND: the
metadata TTL, which bounds what any other folder may show) and 300 s once closed
(IDLE_BOUND). A change, a change made through the mount, or a new opendir starts again at
10 s. A folder of P > 1 LIST pages waits at least P x 30 s (so an open folder of any size
costs at most one page per 30 s on average), one of more than 10 pages (10,000 entries) is not
re-listed in the background at all (the next use after the TTL lists it), and all background
listing together spends at most 60 pages a minute (BUDGET, 10 at once after a quiet spell),
open folders first. An open unchanged folder of 1,000 objects thus costs 22 LISTs in ten
minutes (its opening LIST and re-lists at 10, 30, 60, 90 ... 600 s), not 81; a short look
at one costs 5 after its own (at 10, 30, 70, 150 and 310 s), not 80.
"""

import contextlib
import logging
import math
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

PAGE = 1000  # entries per LIST page
OPEN_BOUND = 30.0  # seconds: the longest wait between re-lists of an open folder of one page
IDLE_BOUND = 300.0  # seconds: the longest wait for a closed folder still in use
PAGE_SPACING = 30.0  # seconds per page: a folder of P pages waits at least P x this
MAX_PAGES = 10  # folders of more pages are re-listed only when used (after the TTL)
BUDGET = 60  # background LIST pages per minute, all folders together
BURST = 10  # pages the budget lets through at once after a quiet spell
PAGE_COST = 60.0 / BUDGET  # seconds of budget one page uses


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
        # The refresher's schedule, on trio's clock (tests drive it with a MockClock):
        self._checked_at: cachetools.LRUCache = cachetools.LRUCache(maxsize)  # last LIST's start
        self._unchanged: cachetools.LRUCache = cachetools.LRUCache(maxsize)  # listings alike in a row
        self._recent: cachetools.TTLCache = cachetools.TTLCache(watch_max, watch_window,
                                                                timer=trio.current_time)
        self._base = 10.0  # refresh_interval, set by refresh_loop
        self._budget_at = -math.inf  # when the background budget is spent up to (GCRA)
        self._wake = trio.Event()  # a new use: the refresher looks at its schedule again
        self._open: dict[int, str] = {}  # directory handle -> folder
        self._absent: cachetools.TTLCache = cachetools.TTLCache(channel_size, ttl)  # negative entries
        self._send, self.changes = trio.open_memory_channel[Change](channel_size)
        self.version = 0  # bumped by every change to a cached listing (lets the core reuse work)

    # ----- what the core calls ----------------------------------------------------------

    async def fetch(self, dir_path: str, one_page: bool = False) -> Entries | None:
        """List `dir_path` in S3 (one LIST in flight per folder), cache it, report changes.
        `one_page`: only if one LIST page holds it all, else None (see `list_ahead`)."""
        fetch = self._inflight.get(dir_path)
        if fetch is not None and not fetch.stale:
            await fetch.done.wait()
            if fetch.error is not None:
                raise fetch.error
            if fetch.entries is not None or one_page:
                return fetch.entries
            return await self.fetch(dir_path)  # that was a look at one page of a larger folder
        fetch = self._inflight[dir_path] = _Fetch()
        started = trio.current_time()
        path = dir_path + "/" if dir_path else ""
        try:
            listing = await (self._store.list_dir_page(path) if one_page else self._store.list_dir(path))
            fetch.entries = None if listing is None else self._convert(dir_path, listing)
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
        if not fetch.stale and fetch.entries is not None:
            self._store_listing(dir_path, fetch.entries, started)
        return fetch.entries

    def list_ahead(self, dir_path: str, name: str, nursery: trio.Nursery) -> None:
        """A lookup of `name` is about to list `dir_path`: list `dir_path/name` beside it.

        A cold path walk (`head -c 1 ~/minerva/Outgoing/a/b/c/file` on a fresh mount) asks
        the kernel's lookups one level at a time, each waiting for its folder's LIST: one round
        trip per level. If `name` is a folder, the walk goes on into it, and its listing is
        then on its way or there: two levels per round trip (5 sequential round trips down to
        the first byte of that file become 3). Costs at most one LIST page per LIST of a
        folder (wasted when `name` is a file or missing, or holds more than one page: a `stat`
        of a folder of 10,000 objects must not list them all); kept only if `name` is a folder.
        """
        child = join(dir_path, name)
        if (self.get(dir_path) is not None or dir_path in self._inflight  # one per LIST of the folder
                or child in self._inflight or self.get(child) is not None):
            return
        nursery.start_soon(self._ahead, dir_path, name, child)

    async def _ahead(self, dir_path: str, name: str, child: str) -> None:
        try:
            await self.fetch(child, one_page=True)
        except MinervaError as exc:
            log.debug("listing %s ahead of a lookup failed: %s", child, exc)
            return
        if (parent := self._inflight.get(dir_path)) is not None:
            await parent.done.wait()
        entries = self.get(dir_path)
        if entries is not None and entries.get(name, GONE) is not DIR:
            self.pop(child, None)  # a file, or nothing: the listing answers no question

    def forget(self, dir_path: str) -> None:
        """The folder changed through the mount: the next use lists it again."""
        self.version += 1
        self._unchanged.pop(dir_path, None)
        self._wake.set()
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
        self._unchanged.pop(dir_path, None)  # the folder is in use: re-list it soon again
        self._wake.set()
        entries = self.get(dir_path)  # patched in place: its age (TTL) stays that of the LIST
        if entries is None:
            return
        if entry is GONE:
            entries.pop(name, None)
        else:
            entries[name] = entry

    def created(self, dir_path: str) -> None:
        """A folder just made through the mount, where nothing was: its listing is known
        (empty), so a copy into it costs no LIST (a round trip before the first file)."""
        self._store_listing(dir_path, {}, trio.current_time())

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
        """A new use: the folder is watched for `watch_window`, re-listed 10 s on at first."""
        self._open[fh] = dir_path
        self._recent[dir_path] = True
        self._unchanged.pop(dir_path, None)
        self._wake.set()

    def closed(self, fh: int) -> None:
        self._open.pop(fh, None)

    # ----- keeping folders in use fresh ---------------------------------------------------

    def watched(self) -> list[str]:
        """Folders in use: open now, or listed within the watch window (bounded)."""
        return sorted(set(self._recent.keys()) | set(self._open.values()))

    def pages(self, dir_path: str) -> int:
        """LIST pages the folder's last listing took (1 if never listed)."""
        return max(1, -(-len(self._known.get(dir_path) or ()) // PAGE))

    def interval(self, dir_path: str, is_open: bool) -> float:
        """Seconds from the start of one LIST of `dir_path` to the next background one."""
        cap = max(self._base, OPEN_BOUND if is_open else IDLE_BOUND)
        wait = min(self._base * 2 ** min(self._unchanged.get(dir_path, 0), 16), cap)
        pages = self.pages(dir_path)
        return wait if pages == 1 else max(wait, pages * PAGE_SPACING)

    def due(self, now: float) -> tuple[list[str], float]:
        """Folders due for a background LIST, open ones first, then the longest overdue; and
        when the next of the others falls due."""
        open_now = set(self._open.values())
        due, next_at = [], math.inf
        for dir_path in self.watched():
            if self.pages(dir_path) > MAX_PAGES:
                continue
            checked = self._checked_at.get(dir_path)
            at = -math.inf if checked is None else checked + self.interval(dir_path, dir_path in open_now)
            if at <= now:
                due.append((dir_path not in open_now, at, dir_path))
            else:
                next_at = min(next_at, at)
        return [dir_path for *_, dir_path in sorted(due)], next_at

    async def refresh_once(self, min_age: float = 0.0) -> int:
        """Re-list every folder in use last listed at least `min_age` seconds ago (no backoff,
        no budget: for tests and callers that want it now)."""
        count = 0
        for dir_path in self.watched():
            checked = self._checked_at.get(dir_path)
            if checked is not None and trio.current_time() - checked < min_age:
                continue
            if await self._relist(dir_path):
                count += 1
        return count

    async def refresh_loop(self, interval: float) -> None:
        """Re-list folders in use on the schedule the module docstring states: `interval`
        after a listing, doubling while unchanged, within the budget."""
        self._base = max(interval, 0.2)
        while True:
            now = trio.current_time()
            due, next_at = self.due(now)
            if not due:
                with trio.move_on_at(next_at):
                    await self._wake.wait()
                self._wake = trio.Event()
                continue
            if self._budget_at - BURST * PAGE_COST > now:
                await trio.sleep_until(self._budget_at - BURST * PAGE_COST)
                continue  # what is due may have changed meanwhile
            self._budget_at = max(self._budget_at, now) + self.pages(due[0]) * PAGE_COST
            await self._relist(due[0])

    async def _relist(self, dir_path: str) -> bool:
        started = trio.current_time()
        try:
            await self.fetch(dir_path)
            return True
        except MinervaError as exc:
            self._unchanged[dir_path] = self._unchanged.get(dir_path, 0) + 1  # back off failing too
            log.warning("could not re-list %s: %s", dir_path or "/", exc)
            return False
        finally:  # also when the answer was not kept (changed meanwhile): not again at once
            self._checked_at[dir_path] = max(self._checked_at.get(dir_path, started), started)

    # ----- comparing listings ---------------------------------------------------------------

    def _store_listing(self, dir_path: str, entries: Entries, started: float) -> None:
        before = self._known.get(dir_path)
        alike = before is not None and before == entries
        self._unchanged[dir_path] = self._unchanged.get(dir_path, 0) + 1 if alike else 0
        self._checked_at[dir_path] = started
        self.version += 1
        self[dir_path] = entries
        self._known[dir_path] = entries
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
