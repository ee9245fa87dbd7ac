"""Reads of open files, block by block: memory, then the disk cache, then ranged GETs.

`Blocks` is shared by every open file, so concurrent readers of one object share its blocks
and a block is never fetched twice at once (one in-flight event per block). `Reader` is one
open file: the kernel asks for 128 KiB at a time, so a sequential reader gets a readahead
window that doubles on each sequential read (1 MiB up to `max_window`, as mountpoint-s3's
prefetcher grows its requests), fetched as several ranged GETs in parallel by tasks in the
daemon's nursery. A random or small read (a file-type sniff, the head of a big file) fetches
only the bytes it asks for, unless their blocks are at hand; a seek resets the window.

What a first read fetches, and why (issue 12: at 40 ms a GET is a round trip, and a
thumbnailer reads an image's first 128 KiB, then the rest: two GETs per JPEG, the head twice):
- a file of at most 256 KiB (WHOLE_FILE, a quarter block), or an image by its name (.jpg,
  .png, .heic ...) of at most 8 MiB (WHOLE_IMAGE, 8 blocks; counted in blocks because what is
  fetched is kept as blocks), is fetched whole by its first read, in one GET, and kept (memory,
  disk cache). Whoever opens an image reads all of it (a thumbnailer, a viewer), and for a
  small file the bytes a head-only reader did not want cost less than the round trip a second
  GET would: at most 256 KiB, 5 ms at 400 Mbit/s, against 40 ms. A folder of 40 images shown
  with thumbnails costs 40 GETs, not 80;
- other first reads fetch just their bytes, and that exact range is remembered in memory
  (EXACT_BYTES, least recently used first), so the same bytes read again, by this handle or
  another, cost no GET. The head of a big file (the bench's first 64 KiB of 2 MiB files) stays
  one small GET, not a block: fetching 1 MiB there would add 20 ms at 400 Mbit/s per file.
"""

import logging
from collections import OrderedDict

import trio

from .blockcache import BLOCK_SIZE, BlockCache, object_id
from .errors import MinervaError
from .store import ObjectChanged, ObjectInfo

log = logging.getLogger("minerva.reader")

MAX_WINDOW = 64 << 20
GET_SIZE = 32 << 20  # one ranged GET fetches up to this much of a readahead window
MAX_GETS = 8  # readahead GETs in flight, all files together
MEMORY_BYTES = 256 << 20  # blocks held in memory, all files together
WHOLE_FILE = 1 / 4  # blocks: a file this small is fetched whole by its first read (256 KiB)
WHOLE_IMAGE = 8  # blocks: an image this small too (8 MiB): thumbnailers, viewers read it all
IMAGE_SUFFIXES = frozenset({
    "jpg", "jpeg", "jpe", "jfif", "png", "apng", "gif", "webp", "bmp", "tif", "tiff", "heic",
    "heif", "avif", "jxl", "ico", "svg", "svgz", "tga", "ppm", "pgm", "pbm", "pnm", "xpm"})
EXACT_BYTES = 16 << 20  # exact ranges remembered in memory, all files together
EXACT_RANGES = 256  # and at most this many (each read looks through them)
MAX_PENDING_WRITES = 4  # fetched runs (up to GET_SIZE each) waiting for the disk cache;
# beyond that a run is not cached: the cache writes at idle CPU priority, and on a busy machine
# holding reads up for it costs more than fetching those blocks again some day


class Blocks:
    """Blocks of object versions, as bytes, wherever they are; memory bounded by bytes."""

    def __init__(self, store, nursery: trio.Nursery, cache: BlockCache | None = None,
                 block_size: int = BLOCK_SIZE, memory_bytes: int = MEMORY_BYTES):
        self.store = store
        self.nursery = nursery
        self.cache = cache
        self.block_size = cache.block_size if cache is not None else block_size
        self.memory_bytes = memory_bytes
        self._memory: OrderedDict[str, memoryview] = OrderedDict()
        # Blocks in memory whose disk-cache write was skipped (the writer was behind): written
        # when next used, if the writer has room then, so a busy spell costs no block for good.
        self._unwritten: set[str] = set()
        self._memory_used = 0
        self._inflight: dict[str, trio.Event] = {}
        self._gets = trio.CapacityLimiter(MAX_GETS)
        self._ids: dict[tuple[str, str], str] = {}  # (path, etag) -> hashed file-name stem
        self._exact: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()  # (stem, start, end)
        self._exact_used = 0
        self._writes = trio.Semaphore(MAX_PENDING_WRITES)
        self.skipped_writes = 0  # fetched blocks not cached on disk because writes fell behind
        self.hits = self.misses = 0  # blocks a read found in memory or on disk / had to fetch

    def stats(self) -> dict:
        """For `minerva-mount status`: blocks served at hand vs fetched, and the disk cache."""
        stats = {"hits": self.hits, "misses": self.misses, "memory_bytes": self._memory_used,
                 "skipped_writes": self.skipped_writes}
        if self.cache is not None:
            stats.update(dir=str(self.cache.root), disk_bytes=self.cache.used,
                         disk_max_bytes=self.cache.max_bytes, corrupt_dropped=self.cache.dropped_corrupt,
                         write_failures=self.cache.write_failures, write_error=self.cache.write_error)
        return stats

    @property
    def pending_writes(self) -> int:
        """Fetched runs not yet written to the disk cache."""
        return MAX_PENDING_WRITES - self._writes.value

    def reads_whole(self, info: ObjectInfo) -> bool:
        """Whether the first read of `info` fetches all of it (see the module docstring)."""
        if info.size <= WHOLE_FILE * self.block_size:
            return True
        suffix = info.path.rpartition("/")[2].rpartition(".")[2].lower()
        return info.size <= WHOLE_IMAGE * self.block_size and suffix in IMAGE_SUFFIXES

    def count(self, info: ObjectInfo) -> int:
        return -(-info.size // self.block_size)

    def _name(self, info: ObjectInfo, index: int) -> str:
        return f"{self._stem(info)}-{index}"

    def _stem(self, info: ObjectInfo) -> str:
        stem = self._ids.get((info.path, info.etag))
        if stem is None:
            if len(self._ids) > 4096:
                self._ids.clear()
            stem = self._ids[(info.path, info.etag)] = object_id(info.path, info.etag)
        return stem

    def _remember(self, name: str, data: memoryview) -> None:
        """Keep a block in memory (each block is its own buffer: a GET's body is read piece
        by piece, see S3Store.get_blocks), dropping the least recently used beyond the budget."""
        self._forget(name)
        self._memory[name] = data
        self._memory_used += len(data)
        while self._memory_used > self.memory_bytes and len(self._memory) > 1:
            self._forget(next(iter(self._memory)))

    def _forget(self, name: str) -> None:
        self._unwritten.discard(name)
        data = self._memory.pop(name, None)
        if data is not None:
            self._memory_used -= len(data)

    async def get(self, info: ObjectInfo, index: int) -> memoryview:
        """Block `index` of the object version `info`, fetched if nobody has it."""
        name = self._name(info, index)
        waited = False
        while True:
            data = self._memory.get(name)
            if data is not None:
                self._memory.move_to_end(name)
                self.hits += 1
                if name in self._unwritten:
                    self._write_skipped()
                return data
            event = self._inflight.get(name)
            if event is None or waited:
                break
            waited = True  # someone fetches it; if that failed, we fetch it ourselves
            await event.wait()
        if self.cache is not None and self.cache.has(name):
            raw = await self.cache.get(name)
            if raw is not None:
                data = memoryview(raw)
                self._remember(name, data)
                self.hits += 1
                return data
        self.misses += 1
        return (await self._fetch(info, index, index + 1))[0]

    async def get_exact(self, info: ObjectInfo, start: int, end: int) -> bytes:
        """Bytes [start, end) in one GET, unless a remembered range holds them: for random
        reads, which should not pay for a whole block. Kept in memory only (EXACT_BYTES)."""
        bs = self.block_size
        if start % bs == 0 and (end % bs == 0 or end == info.size):  # whole blocks: keep them
            return b"".join(await self._fetch(info, start // bs, -(-end // bs)))
        stem = self._stem(info)
        for key, data in self._exact.items():
            if key[0] == stem and key[1] <= start and end <= key[2]:
                self._exact.move_to_end(key)
                self.hits += 1
                return data[start - key[1]:end - key[1]]
        data = await self.store.get_range(info.path, start, end, info.etag or None)
        if len(data) != end - start:
            raise MinervaError(f"read {info.path}: S3 sent {len(data)} bytes for {end - start}")
        if info.etag and len(data) <= EXACT_BYTES // 4:
            self._exact[(stem, start, end)] = data = bytes(data)
            self._exact_used += len(data)
            while self._exact_used > EXACT_BYTES or len(self._exact) > EXACT_RANGES:
                self._exact_used -= len(self._exact.popitem(last=False)[1])
        return data

    async def fetch(self, info: ObjectInfo, first: int, last: int) -> list[memoryview]:
        """Blocks [first, last) in one GET now (a read waits for them), kept like any block."""
        self.misses += last - first
        return await self._fetch(info, first, last)

    def missing(self, info: ObjectInfo, index: int) -> str | None:
        """'get' if the block needs fetching, 'disk' if it is only on disk, None if at hand."""
        name = self._name(info, index)
        if name in self._memory or name in self._inflight:
            return None
        if self.cache is not None and self.cache.has(name):
            return "disk"
        return "get"

    def prefetch(self, info: ObjectInfo, first: int, last: int) -> None:
        """Start fetching blocks [first, last) that no one has: runs of GETs, or disk loads."""
        run: list[int] = []

        def flush():
            if run:
                claimed = self._claim([self._name(info, i) for i in run])  # now: readers wait for it
                self.nursery.start_soon(self._background, self._fetch, info, run[0], run[-1] + 1, claimed)
                run.clear()
        for index in range(first, last):
            where = self.missing(info, index)
            if where == "get":
                run.append(index)
                if len(run) * self.block_size >= GET_SIZE:
                    flush()
                continue
            flush()
            if where == "disk":
                claimed = self._claim([self._name(info, index)])
                self.nursery.start_soon(self._background, self._load, info, index, claimed)
        flush()

    def _claim(self, names: list[str]) -> list[tuple[str, trio.Event]]:
        """Mark blocks as being fetched, so other readers wait instead of fetching them too."""
        claimed = []
        for name in names:
            if name not in self._inflight:
                claimed.append((name, trio.Event()))
                self._inflight[name] = claimed[-1][1]
        return claimed

    def _release(self, claimed: list[tuple[str, trio.Event]]) -> None:
        for name, event in claimed:
            if self._inflight.get(name) is event:
                del self._inflight[name]
            event.set()

    async def _background(self, fn, *args) -> None:
        """Readahead never fails the daemon: a failed block is fetched again when read."""
        try:
            await fn(*args)
        except MinervaError as exc:
            log.warning("readahead: %s", exc)
        except Exception:
            log.exception("readahead failed")

    async def _load(self, info: ObjectInfo, index: int, claimed) -> None:
        name = self._name(info, index)
        try:
            raw = await self.cache.get(name)
            if raw is not None:
                self._remember(name, memoryview(raw))
        finally:
            self._release(claimed)

    async def _fetch(self, info: ObjectInfo, first: int, last: int, claimed=None) -> list[memoryview]:
        """GET blocks [first, last) in one request; keep them in memory, and on disk if the
        cache keeps up.

        Readahead (`claimed` given) waits for a slot among MAX_GETS; a read waiting on its
        block goes first.
        """
        names = [self._name(info, i) for i in range(first, last)]
        limited = claimed is not None
        if claimed is None:
            claimed = self._claim(names)
        start, end = first * self.block_size, min(last * self.block_size, info.size)
        try:
            args = (info.path, start, end, self.block_size, info.etag or None)
            if limited:
                async with self._gets:
                    pieces = await self.store.get_blocks(*args)
            else:
                pieces = await self.store.get_blocks(*args)
            got = sum(len(piece) for piece in pieces)
            if got != end - start or len(pieces) != len(names):
                raise MinervaError(f"read {info.path}: S3 sent {got} bytes for {end - start}")
            blocks = [memoryview(piece) for piece in pieces]
            for name, block in zip(names, blocks, strict=True):
                self._remember(name, block)
        finally:
            self._release(claimed)
        if self.cache is not None and info.etag:
            try:
                self._writes.acquire_nowait()  # bounds the bytes waiting to be written
            except trio.WouldBlock:  # the disk cache is behind: reading on beats caching all
                self.skipped_writes += len(blocks)
                self._unwritten.update(names)
            else:
                self.nursery.start_soon(self._write, list(zip(names, blocks, strict=True)))
        return blocks

    def _write_skipped(self, most: int = 32) -> None:
        """Write blocks whose write was skipped, now that one of them is used again (at most
        `most`, as one batch, and only if the writer has room: never waits)."""
        try:
            self._writes.acquire_nowait()
        except trio.WouldBlock:
            return
        def order(name: str) -> tuple[str, int]:
            stem, _, index = name.rpartition("-")
            return stem, int(index)
        names = sorted((n for n in self._unwritten if n in self._memory), key=order)[:most]
        self._unwritten.difference_update(names)
        if not names:
            self._writes.release()
            return
        self.nursery.start_soon(self._write, [(n, self._memory[n]) for n in names])

    async def _write(self, blocks: list[tuple[str, memoryview]]) -> None:
        try:
            await self.cache.put_many(blocks)
        except Exception:
            log.exception("block cache write failed")
        finally:
            self._writes.release()


class Reader:
    """One open file: sequential detection and the readahead window."""

    def __init__(self, blocks: Blocks, info: ObjectInfo, max_window: int = MAX_WINDOW):
        self._blocks = blocks
        self._info = info
        self._bs = blocks.block_size
        self._max_window = max(max_window, self._bs)
        self._window = self._bs
        self._last_end: int | None = None
        self._ahead = 0  # blocks before this one were already asked for
        self._served = False

    async def read(self, offset: int, size: int) -> bytes | memoryview:
        """Bytes [offset, offset+size) clipped at EOF; a view into a block when it lies in one
        (pyfuse3 takes any buffer, and a 1 MiB copy per read is worth saving).

        An object replaced in S3 after the listing we opened from: if nothing was read yet,
        the new version is read; after that, the handle fails (EIO) rather than mix versions.
        """
        try:
            data = await self._read(offset, size)
        except ObjectChanged:
            if self._served:
                log.warning("%s changed in S3 while open; reopen it to read the new version",
                            self._info.path)
                raise
            self._info = await self._blocks.store.head(self._info.path)
            self._window, self._ahead, self._last_end = self._bs, 0, None
            data = await self._read(offset, size)
        self._served = True
        return data

    async def _read(self, offset: int, size: int) -> bytes | memoryview:
        end = min(offset + size, self._info.size)
        if offset >= end:
            return b""
        bs = self._bs
        first, last = offset // bs, (end - 1) // bs + 1
        # The kernel has several reads in flight and may answer them out of order: near the
        # last end counts as sequential.
        if self._last_end is not None and abs(offset - self._last_end) <= 2 * bs:
            self._window = min(self._window * 2, self._max_window)
            ahead_end = min(self._blocks.count(self._info), (end + self._window - 1) // bs + 1)
            start = max(self._ahead, last)
            # Extend in whole GETs, not a block per read: small GETs waste the link.
            step = min(GET_SIZE, self._window) // bs
            at_end = ahead_end == self._blocks.count(self._info)
            if ahead_end > start and (ahead_end - start >= step or at_end):
                self._blocks.prefetch(self._info, start, ahead_end)
                self._ahead = ahead_end
        else:
            self._window, self._ahead = bs, 0
            if all(self._blocks.missing(self._info, i) == "get" for i in range(first, last)):
                self._last_end = end
                if self._blocks.reads_whole(self._info):  # a small file, an image: all of it, kept
                    self._ahead = count = self._blocks.count(self._info)
                    blocks = await self._blocks.fetch(self._info, 0, count)
                    return self._cut(blocks[first:last], offset, end, first, last)
                # A random read (a file-type probe, the head of a big file): just its bytes.
                return await self._blocks.get_exact(self._info, offset, end)
        self._last_end = end
        pieces = [await self._blocks.get(self._info, index) for index in range(first, last)]
        return self._cut(pieces, offset, end, first, last)

    def _cut(self, pieces: list[memoryview], offset: int, end: int, first: int,
             last: int) -> bytes | memoryview:
        """Bytes [offset, end) of blocks [first, last)."""
        bs = self._bs
        head, tail = offset - first * bs, end - (last - 1) * bs
        if len(pieces) == 1:
            return pieces[0][head:tail]
        # Copy just the bytes asked for, once: the kernel's reads need not start on a block
        # (fio's 1 MiB readahead requests start mid-block), and joining whole blocks before
        # slicing copied three times as much.
        pieces[0], pieces[-1] = pieces[0][head:], pieces[-1][:tail]
        return b"".join(pieces)
