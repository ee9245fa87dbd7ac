"""On-disk block cache: fixed-size blocks of objects, keyed by path + ETag, LRU by bytes.

A changed object has a new ETag, hence new block names: old bytes are never served, they
simply age out. Blocks are stored in runs: one file holds the consecutive blocks one GET
fetched (up to 32), since creating a file per block cost ~9% of the daemon's CPU on a cold
read (ext4 inode allocation), and a cold read is CPU-bound. Run files are written by one
thread at idle CPU priority (idle.py), so caching only uses CPU time the reads that fetched
the blocks leave over (RunWriter). A run file starts with a header holding,
per block, its length and CRC-32; a block that fails the check (corrupt, truncated) is marked
dead in that header and reported as a miss, so the caller fetches it again (into a new run).
The index (one small entry per block, one per run) is rebuilt from the run headers at start,
so blocks survive daemon restarts while memory stays bounded by the number of blocks, not
their bytes. Eviction is LRU by run; reads and deletions run in worker threads under a
CapacityLimiter.

The cache folder may be on a disk other users share (even /tmp): its blocks folder is opened
through safepaths (no symlink followed, ours and 0700, else the daemon refuses to start) and
kept open; every file in it is opened relative to that fd with O_NOFOLLOW and must be ours,
so the mount never serves bytes another user could have written. A cache write that fails
(disk full, a short write) only stops caching: the run is dropped, one warning per episode,
and no run is written for WRITE_PAUSE seconds; reads go on from S3.
"""

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import stat
import struct
import time
from collections import OrderedDict
from pathlib import Path

import trio

from .idle import IdleWorker
from .safepaths import UnsafePath, mkdir_private_at, open_private_dir, open_private_file_at

try:  # ISA-L's CRC-32: the same value as zlib's, about 30x faster (zlib's costs ~0.5 s CPU/GiB)
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - the dependency is optional for the format
    from zlib import crc32

log = logging.getLogger("minerva.blockcache")

BLOCK_SIZE = 1 << 20
DEFAULT_CACHE_SIZE = 10 << 30
HEADER = struct.Struct(">4sIQI")  # magic, block size, index of the first block, block count
ENTRY = struct.Struct(">II")  # per block: payload length, crc32 of payload
MAGIC = b"MVR1"
DEAD = 1 << 31  # flag on the length of a block found corrupt: never indexed again
MAX_RUN = 256  # blocks per run file, at most; and runs stay within a quarter of the cache's cap
WRITE_PAUSE = 30.0  # seconds without cache writes after one failed (a full disk stays full a while)
_NAME = re.compile(r"^([0-9a-f]{32})-([0-9]+)-([0-9]+)$")  # object id, first block, count
_SUB = re.compile(r"^[0-9a-f]{2}$")  # runs sit in 256 subfolders, by the first 2 hex digits
Run = tuple[str, int, list[tuple[str, bytes]]]  # object id, first block index, (name, bytes) each
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'512M', '10G', '10GiB', '1048576' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 512M or 10G)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "minerva-mount"


def object_id(path: str, etag: str) -> str:
    """The file-name stem of an object version: a hash, so keys of any length and charset fit."""
    return hashlib.blake2b(f"{path}\0{etag}".encode(), digest_size=16).hexdigest()


def header_size(count: int) -> int:
    return HEADER.size + count * ENTRY.size


def data_offset(count: int) -> int:
    """Blocks start on a page boundary: each fills whole pages of the page cache."""
    return -(-header_size(count) // 4096) * 4096


def run_file_size(lengths: list[int]) -> int:
    """Bytes on disk of a run file holding blocks of these lengths."""
    return data_offset(len(lengths)) + sum(lengths)


class BlockCache:
    def __init__(self, root: Path, max_bytes: int = DEFAULT_CACHE_SIZE, block_size: int = BLOCK_SIZE,
                 max_threads: int = 4):
        # Blocks of another size are another cache: keep them apart rather than misread them.
        self.root = Path(root) / f"blocks-{block_size}"
        self.max_bytes = max_bytes
        self.block_size = block_size
        self._limiter = trio.CapacityLimiter(max_threads)
        self._index: dict[str, str] = {}  # block name -> name of the run file holding it
        self._runs: OrderedDict[str, int] = OrderedDict()  # run file name -> bytes on disk, LRU first
        self._writing: set[str] = set()
        self._writer = IdleWorker("block cache writer")
        self._dir: int | None = None  # fd of self.root, checked private (safepaths), once open
        self.used = 0
        self.dropped_corrupt = 0
        self.write_failures = 0  # runs not cached because a write to disk failed
        self.write_error: str | None = None  # the failing write's path and error, until one succeeds
        self.write_pause = WRITE_PAUSE
        self._paused_until = 0.0  # time.monotonic() before which no run is written

    # ----- start ------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the folders (0700) and rebuild the index from what an earlier run left."""
        runs = await trio.to_thread.run_sync(self._scan, limiter=self._limiter)
        for run, size, blocks in runs:
            self._add_run(run, size, blocks)
        log.info("block cache %s: %d blocks in %d files, %d MiB of %d MiB", self.root, len(self._index),
                 len(self._runs), self.used >> 20, self.max_bytes >> 20)
        await self._evict()

    def close(self) -> None:
        """Close the folder's fd, once no read or write of the cache is under way (at exit)."""
        if self._dir is not None:
            os.close(self._dir)
            self._dir = None

    def _scan(self) -> list[tuple[str, int, list[str]]]:
        # A folder the user named may be shared (even /tmp): only ours is made private, and
        # a symlink or someone else's folder in its place raises UnsafePath (not used).
        self.close()
        self._dir = open_private_dir(self.root)
        found = []
        for sub in os.scandir(self._dir):
            if not _SUB.match(sub.name):
                continue
            try:
                sub_fd = mkdir_private_at(self._dir, sub.name, create=False)
            except UnsafePath as exc:  # left from before it was private, or planted: not ours
                log.warning("block cache: removed %s: it %s", exc.path, exc.reason)
                _remove_at(self._dir, sub.name)
                continue
            try:
                for entry in os.scandir(sub_fd):
                    run = _parse_run(entry.name)
                    live = self._live_blocks(sub_fd, entry.name, *run) if run else None
                    if live is None:
                        _unlink(entry.name, sub_fd)  # a write cut short by a crash, an old format,
                        continue  # a stranger's file
                    blocks, st = live
                    found.append((st.st_mtime, entry.name, st.st_size, blocks))
            finally:
                os.close(sub_fd)
        found.sort()  # oldest first: a block in two runs (refetched after damage) takes the newer
        return [(name, size, blocks) for _, name, size, blocks in found]

    def _live_blocks(self, dir_fd: int, name: str, stem: str, first: int,
                     count: int) -> tuple[list[str], os.stat_result] | None:
        """Names of the blocks a run file holds, from its header, and its stat; None if it is
        not a run (or not a file of ours)."""
        try:
            fd = open_private_file_at(dir_fd, name, os.O_RDONLY)
        except UnsafePath as exc:  # never served: the caller removes it
            log.warning("block cache: removed %s: it %s", exc.path, exc.reason)
            return None
        except OSError:
            return None
        try:
            head, st = os.pread(fd, header_size(count), 0), os.fstat(fd)
        except OSError:
            return None
        finally:
            os.close(fd)
        if len(head) != header_size(count):
            return None
        magic, block_size, first_, count_ = HEADER.unpack_from(head)
        if (magic, block_size, first_, count_) != (MAGIC, self.block_size, first, count):
            return None
        return [f"{stem}-{first + i}" for i in range(count)
                if not ENTRY.unpack_from(head, HEADER.size + i * ENTRY.size)[0] & DEAD], st

    def _add_run(self, run: str, size: int, blocks: list[str]) -> None:
        self._runs[run] = size
        self.used += size
        for name in blocks:
            self._index[name] = run

    # ----- blocks -----------------------------------------------------------------------

    @staticmethod
    def _path(run: str) -> str:
        """Where a run file is, relative to the folder's fd (its subfolder was checked private
        and nobody else can write in the folder, so the subfolder is no symlink)."""
        return f"{run[:2]}/{run}"

    @staticmethod
    def name(path: str, etag: str, index: int) -> str:
        return f"{object_id(path, etag)}-{index}"

    def has(self, name: str) -> bool:
        return name in self._index

    async def get(self, name: str) -> bytes | None:
        """The block's bytes if cached and intact; None otherwise (a bad block is dropped)."""
        run = self._index.get(name)
        if run is None:
            return None
        self._runs.move_to_end(run)
        _, first, count = _parse_run(run)
        slot = int(name.rsplit("-", 1)[1]) - first
        data = await trio.to_thread.run_sync(self._read, self._path(run), slot, count,
                                             limiter=self._limiter)
        if data is None and self._index.get(name) == run:
            log.warning("block cache: dropped corrupt or missing block %s", name)
            self.dropped_corrupt += 1
            del self._index[name]
        return data

    def _read(self, path: str, slot: int, count: int) -> bytes | None:
        if self._dir is None:  # closed: the daemon is stopping
            return None
        try:  # never a symlink, never a file another user could have written
            fd = open_private_file_at(self._dir, path, os.O_RDWR)
        except OSError:
            return None
        try:
            head = os.pread(fd, header_size(count), 0)
            if len(head) == header_size(count) and HEADER.unpack_from(head)[0] == MAGIC:
                entries = [ENTRY.unpack_from(head, HEADER.size + i * ENTRY.size) for i in range(slot + 1)]
                length, crc = entries[slot]
                if not length & DEAD:
                    offset = data_offset(count) + sum(n & ~DEAD for n, _ in entries[:slot])
                    data = os.pread(fd, length, offset)
                    if len(data) == length and crc32(data) == crc:
                        os.utime(fd)  # recency survives a restart
                        return data
                    _pwrite_all(fd, ENTRY.pack(length | DEAD, crc), HEADER.size + slot * ENTRY.size)
        except OSError:
            return None
        finally:
            os.close(fd)
        return None

    @property
    def longest_run(self) -> int:
        """Runs stay within a quarter of the cap, so eviction frees room in small steps."""
        return max(1, min(MAX_RUN, self.max_bytes // (4 * self.block_size)))

    async def _commit(self, writer: "RunWriter") -> None:
        """Index a run its writer completed (else drop what it wrote), then evict to the cap."""
        if not writer.done:
            writer.discard()
            return
        if writer.run in self._runs:  # rewritten (after its blocks were found damaged)
            self.used -= self._runs.pop(writer.run)
        self._add_run(writer.run, writer.size, writer.names)
        await self._evict()

    async def put(self, name: str, data: bytes) -> None:
        await self.put_many([(name, data)])

    async def put_many(self, blocks: list[tuple[str, bytes]]) -> None:
        """Store blocks, consecutive ones of an object in one run file each, in one call to
        the idle-priority writer (atomically each: a crash leaves a .tmp file, removed at next
        start)."""
        todo = [(name, data) for name, data in blocks if name not in self._index
                and name not in self._writing]
        if not todo or time.monotonic() < self._paused_until:  # a write failed a moment ago
            return
        self._writing.update(name for name, _ in todo)
        try:
            written = await self._writer.run(self._write_all, _runs_of(todo, self.longest_run))
        finally:
            self._writing.difference_update(name for name, _ in todo)
        for writer in written:
            await self._commit(writer)

    def _write_all(self, runs: list[Run]) -> list["RunWriter"]:
        written = []
        for stem, first, blocks in runs:
            if time.monotonic() < self._paused_until:  # a write just failed: the rest would too
                break
            writer = RunWriter(self, stem, first, [len(data) for _, data in blocks])
            for index, (_, data) in enumerate(blocks):
                writer.add(index, data)
            written.append(writer)
        return written

    async def _evict(self) -> None:
        victims = []
        while self.used > self.max_bytes and self._runs:
            run, size = self._runs.popitem(last=False)
            self.used -= size
            stem, first, count = _parse_run(run)
            for index in range(first, first + count):
                name = f"{stem}-{index}"
                if self._index.get(name) == run:
                    del self._index[name]
            victims.append(self._path(run))
        if victims:
            await trio.to_thread.run_sync(lambda: [_unlink(p, self._dir) for p in victims],
                                          limiter=self._limiter)

    def _write_failed(self, path: str, exc: Exception) -> None:
        """A run could not be written (in the writer's thread): pause caching, warn once."""
        self.write_failures += 1
        self._paused_until = time.monotonic() + self.write_pause
        reason = getattr(exc, "strerror", None) or str(exc)
        if self.write_error is None:
            log.warning("block cache: cannot write %s: %s; not caching for %.0f s, reads go on from S3",
                        path, reason, self.write_pause)
        self.write_error = f"{path}: {reason}"

    def _write_ok(self) -> None:
        if self.write_error is not None:
            log.info("block cache: writing to %s again", self.root)
            self.write_error = None


class RunWriter:
    """Writes one run file, block by block (in the cache's idle-priority thread).

    Blocks go after the header's room; the header, with every block's CRC-32, is written
    last, then the file is renamed into place: a crash leaves only a .tmp file, removed at
    the next start. Disk errors (a full disk, a write that writes nothing) never fail a read:
    the run is just not cached. Files are made in the run's subfolder, opened through
    safepaths, relative to its fd. (A write per block, never one writev of the run: large
    writes make the kernel fill 2 MiB page-cache folios, ~4x the CPU per byte on a VM.)
    """

    def __init__(self, cache: BlockCache, stem: str, first: int, lengths: list[int]):
        self.run = f"{stem}-{first}-{len(lengths)}"
        self.names = [f"{stem}-{first + i}" for i in range(len(lengths))]
        self.size = run_file_size(lengths) if cache.max_bytes >= run_file_size(lengths) else 0
        self._cache = cache
        self._tmp = f"{self.run}.{os.getpid()}.tmp"  # another daemon on this folder writes its own
        self._dir: int | None = None  # the run's subfolder
        self._head = HEADER.pack(MAGIC, cache.block_size, first, len(lengths))
        self._lengths = lengths
        self._crcs: list[int] = []
        self._fd: int | None = None
        self._at = data_offset(len(lengths))
        self.done = False
        self.failed = not self.size

    def add(self, index: int, data) -> None:
        """Block `index` of the run, in order."""
        if self.failed or self.done:
            return
        try:
            if index != len(self._crcs) or len(data) != self._lengths[index]:
                raise ValueError(f"block {index} of {len(data)} bytes out of place")
            if self._fd is None:
                if self._cache._dir is None:
                    raise ValueError("the cache is closed")
                self._dir = mkdir_private_at(self._cache._dir, self.run[:2])
                _unlink(self._tmp, self._dir)  # left by a crashed daemon that had our pid
                self._fd = open_private_file_at(self._dir, self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            self._crcs.append(crc32(data))
            _pwrite_all(self._fd, data, self._at)
            self._at += len(data)
            if len(self._crcs) == len(self._lengths):
                self._finish()
        except (OSError, ValueError) as exc:
            self.failed = True
            self.discard()
            self._cache._write_failed(os.path.join(self._cache.root, self.run[:2], self._tmp), exc)

    def _finish(self) -> None:
        head = bytearray(self._head)
        for length, crc in zip(self._lengths, self._crcs, strict=True):
            head += ENTRY.pack(length, crc)
        _pwrite_all(self._fd, head, 0)
        os.close(self._fd)
        self._fd = None
        os.replace(self._tmp, self.run, src_dir_fd=self._dir, dst_dir_fd=self._dir)
        self.done = True
        self.discard()  # closes the folder
        self._cache._write_ok()

    def discard(self) -> None:
        """Drop an unfinished file; close what is open."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._dir is not None:
            if not self.done:
                _unlink(self._tmp, self._dir)
            os.close(self._dir)
            self._dir = None


def _parse_run(run: str) -> tuple[str, int, int] | None:
    """(object id, first block, block count) from a run file's name; None for any other name."""
    match = _NAME.match(run)
    return (match.group(1), int(match.group(2)), int(match.group(3))) if match else None


def _runs_of(blocks: list[tuple[str, bytes]], longest: int) -> list[Run]:
    """Split blocks into runs of consecutive blocks of one object: (stem, first index, blocks)."""
    runs: list[Run] = []
    for name, data in blocks:
        stem, index = name.rsplit("-", 1)
        if runs:
            last_stem, first, members = runs[-1]
            if last_stem == stem and first + len(members) == int(index) and len(members) < longest:
                members.append((name, data))
                continue
        runs.append((stem, int(index), [(name, data)]))
    return runs


def _pwrite_all(fd: int, data, offset: int) -> None:
    """Write all of `data` at `offset`: a short write goes on from where it stopped (the next
    call reports why, e.g. ENOSPC); one that writes nothing is an error."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.EIO, f"short write: {written} of {len(view)} bytes written")
        view, offset = view[written:], offset + written


def _unlink(path: str, dir_fd: int | None) -> None:
    """Remove a file relative to `dir_fd` (None: the cache was closed, nothing is removed);
    one already gone, or that cannot go, is let be."""
    if dir_fd is not None:
        with contextlib.suppress(OSError):
            os.unlink(path, dir_fd=dir_fd)


def _remove_at(dir_fd: int, name: str) -> None:
    """Remove whatever `name` is in `dir_fd` (a symlink is removed, never followed)."""
    try:
        if stat.S_ISDIR(os.lstat(name, dir_fd=dir_fd).st_mode):
            shutil.rmtree(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)
    except OSError as exc:
        log.warning("block cache: cannot remove %s: %s", name, exc.strerror or exc)
