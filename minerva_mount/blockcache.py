"""On-disk block cache: fixed-size blocks of objects, keyed by path + ETag, LRU by bytes.

A changed object has a new ETag, hence new block names: old bytes are never served, they
simply age out. Each block file starts with a header holding its length and CRC-32; a block
that fails the check (corrupt, truncated, foreign) is deleted and reported as a miss, so the
caller fetches it again. The index (one small entry per block) is rebuilt by scanning the
folder at start, so blocks survive daemon restarts while memory stays bounded by the number
of blocks, not their bytes. All disk I/O runs in worker threads under a CapacityLimiter.
"""

import contextlib
import hashlib
import logging
import os
import re
import struct
from collections import OrderedDict
from pathlib import Path

import trio

try:  # ISA-L's CRC-32: the same value as zlib's, about 30x faster (zlib's costs ~0.5 s CPU/GiB)
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - the dependency is optional for the format
    from zlib import crc32

log = logging.getLogger("minerva.blockcache")

BLOCK_SIZE = 1 << 20
DEFAULT_CACHE_SIZE = 10 << 30
HEADER = struct.Struct(">4sII")  # magic, payload length, crc32 of payload
MAGIC = b"MVB1"
_NAME = re.compile(r"^[0-9a-f]{32}-[0-9]+$")
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


class BlockCache:
    def __init__(self, root: Path, max_bytes: int = DEFAULT_CACHE_SIZE, block_size: int = BLOCK_SIZE,
                 max_threads: int = 4):
        # Blocks of another size are another cache: keep them apart rather than misread them.
        self.root = Path(root) / f"blocks-{block_size}"
        self.max_bytes = max_bytes
        self.block_size = block_size
        self._limiter = trio.CapacityLimiter(max_threads)
        self._index: OrderedDict[str, int] = OrderedDict()  # block name -> bytes on disk, LRU first
        self._writing: set[str] = set()
        self.used = 0
        self.dropped_corrupt = 0

    # ----- start ------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the folders (0700) and rebuild the index from what an earlier run left."""
        entries = await trio.to_thread.run_sync(self._scan, limiter=self._limiter)
        for name, size in entries:
            self._index[name] = size
            self.used += size
        log.info("block cache %s: %d blocks, %d MiB of %d MiB", self.root, len(entries),
                 self.used >> 20, self.max_bytes >> 20)
        await self._evict()

    def _scan(self) -> list[tuple[str, int]]:
        # A folder the user named may be shared (even /tmp): only ours is made private.
        os.makedirs(self.root.parent, mode=0o700, exist_ok=True)
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        os.chmod(self.root, 0o700)
        found = []
        for sub in os.scandir(self.root):
            if not sub.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(sub.path):
                if entry.name.endswith(".tmp") or not _NAME.match(entry.name):
                    _unlink(entry.path)  # a write cut short by a crash, or a stranger
                    continue
                st = entry.stat(follow_symlinks=False)
                found.append((st.st_mtime, entry.name, st.st_size))
        found.sort()
        return [(name, size) for _, name, size in found]

    # ----- blocks -----------------------------------------------------------------------

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name[:2], name)

    @staticmethod
    def name(path: str, etag: str, index: int) -> str:
        return f"{object_id(path, etag)}-{index}"

    def has(self, name: str) -> bool:
        return name in self._index

    async def get(self, name: str) -> bytes | None:
        """The block's bytes if cached and intact; None otherwise (a bad block is dropped)."""
        if name not in self._index:
            return None
        self._index.move_to_end(name)
        data = await trio.to_thread.run_sync(self._read, self._path(name), limiter=self._limiter)
        if data is None and name in self._index:
            log.warning("block cache: dropped corrupt or missing block %s", name)
            self.dropped_corrupt += 1
            self.used -= self._index.pop(name)
        return data

    @staticmethod
    def _read(path: str) -> bytes | None:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError:
            return None
        if len(raw) >= HEADER.size:
            magic, length, crc = HEADER.unpack_from(raw)
            data = raw[HEADER.size:]
            if magic == MAGIC and length == len(data) and crc32(data) == crc:
                with contextlib.suppress(OSError):
                    os.utime(path)  # recency survives a restart
                return data
        _unlink(path)
        return None

    async def put(self, name: str, data: bytes) -> None:
        await self.put_many([(name, data)])

    async def put_many(self, blocks: list[tuple[str, bytes]]) -> None:
        """Store blocks, in one worker-thread call (atomically each: a crash leaves a .tmp
        file, removed at next start)."""
        todo = [(name, data) for name, data in blocks if name not in self._index
                and name not in self._writing and len(data) + HEADER.size <= self.max_bytes]
        if not todo:
            return
        self._writing.update(name for name, _ in todo)
        try:
            written = await trio.to_thread.run_sync(self._write_all, todo, limiter=self._limiter)
        finally:
            self._writing.difference_update(name for name, _ in todo)
        for name, size in written:
            self._index[name] = size
            self.used += size
        await self._evict()

    def _write_all(self, blocks: list[tuple[str, bytes]]) -> list[tuple[str, int]]:
        written = []
        for name, data in blocks:
            try:
                self._write(self._path(name), data)
            except OSError as exc:
                log.warning("block cache: cannot write %s: %s", name, exc.strerror)
                continue
            written.append((name, len(data) + HEADER.size))
        return written

    @staticmethod
    def _write(path: str, data: bytes) -> None:
        folder = os.path.dirname(path)
        if not os.path.isdir(folder):
            os.makedirs(folder, mode=0o700, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"  # another daemon on this folder writes its own
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, HEADER.pack(MAGIC, len(data), crc32(data)))
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, path)

    async def _evict(self) -> None:
        victims = []
        while self.used > self.max_bytes and self._index:
            name, size = self._index.popitem(last=False)
            self.used -= size
            victims.append(self._path(name))
        if victims:
            await trio.to_thread.run_sync(lambda: [_unlink(p) for p in victims], limiter=self._limiter)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
