"""Reads through a real mount: the bytes a program reads are the object's, whatever the pattern.

Each test gives the mount its own block cache folder, so it can look at (and damage) blocks.
The kernel's page cache is dropped per file with posix_fadvise where a test needs the read to
reach the daemon again.
"""

import os
import random
import stat
import subprocess
import threading

import pytest
from helpers import wait_for

MIB = 1 << 20


@pytest.fixture
def reading(local_minerva, mount_factory, tmp_path):
    """(mount_with_cache, cache_dir): mounts of a wiped area sharing one block cache folder."""
    local_minerva.wipe()
    cache = tmp_path / "cache"

    def make(name: str = "mnt"):
        return mount_factory(name=name, extra=("--cache-dir", str(cache)))
    return make, cache


def drop_pages(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def pread(path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def cached_after_reading(path, cache, count: int):
    """A poll predicate: read the file again (a block whose write was skipped while the disk
    was behind is fetched and written now) until `count` blocks are in the cache."""
    def check():
        drop_pages(path)
        path.read_bytes()
        return cached_blocks(cache) == count
    return check


def block_files(cache) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, files in os.walk(cache) for f in files
                  if not f.endswith(".tmp"))


def cached_blocks(cache) -> int:
    """Blocks on disk: a file holds a run of them and is named <object>-<first>-<count>."""
    return sum(int(name.rsplit("-", 1)[1]) for name in block_files(cache))


def test_reads_across_block_edges_at_and_beyond_eof(reading, local_minerva):
    make, _ = reading
    data = os.urandom(5 * MIB + 123)
    local_minerva.put("Outgoing/export.bin", data)
    mount = make()
    path = mount.path / "Outgoing" / "export.bin"
    size = len(data)
    cases = [(MIB - 10, 20), (2 * MIB - 1, MIB + 2), (0, size), (size - 5, 100), (size, 10),
             (size + MIB, 10), (3 * MIB, 64 * 1024), (0, 1)]
    for offset, length in cases:
        drop_pages(path)
        assert pread(path, offset, length) == data[offset:offset + length], (offset, length)
    drop_pages(path)
    out = subprocess.run(["dd", f"if={path}", "bs=1M", "status=none"], check=True,
                         capture_output=True).stdout
    assert out == data
    # 256 KiB reads in a row (as fio's): the kernel's readahead then asks for 1 MiB at a time
    # starting mid-block, so every request spans two blocks.
    drop_pages(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = [os.pread(fd, 256 * 1024, at) for at in range(0, size, 256 * 1024)]
    finally:
        os.close(fd)
    assert b"".join(chunks) == data


def test_random_64k_reads_and_blocks_reused_after_restart(reading, local_minerva):
    make, cache = reading
    data = os.urandom(24 * MIB)
    local_minerva.put("Outgoing/media.bin", data)
    mount = make()
    path = mount.path / "Outgoing" / "media.bin"
    rng = random.Random(7)
    offsets = [rng.randrange(0, len(data) - 1) for _ in range(60)]
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset in offsets:
            assert os.pread(fd, 64 * 1024, offset) == data[offset:offset + 64 * 1024], offset
    finally:
        os.close(fd)
    assert (mount.path / "Outgoing" / "media.bin").read_bytes() == data
    wait_for(cached_after_reading(path, cache, 24), "24 blocks written to the cache")
    assert mount.unmount() == 0
    for name in block_files(cache):
        assert stat.S_IMODE(os.stat(name).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    again = make("again")
    assert (again.path / "Outgoing" / "media.bin").read_bytes() == data


def test_first_64k_of_many_small_files(reading, local_minerva):
    make, _ = reading
    rng = random.Random(3)
    files = {f"Outgoing/thumbs/img{i:03}.jpg": os.urandom(rng.randrange(1, 400 * 1024)) for i in range(60)}
    for key, data in files.items():
        local_minerva.put(key, data)
    mount = make()
    for key, data in files.items():
        with open(mount.path / key, "rb") as f:
            assert f.read(64 * 1024) == data[:64 * 1024], key


def test_concurrent_readers_of_one_file(reading, local_minerva):
    make, _ = reading
    data = os.urandom(32 * MIB + 777)
    local_minerva.put("Outgoing/shared.bin", data)
    mount = make()
    path = mount.path / "Outgoing" / "shared.bin"
    results: dict[int, bytes] = {}

    def reader(n: int) -> None:
        chunk = [4096, 128 * 1024, MIB, 3 * MIB + 5][n]
        out = bytearray()
        with open(path, "rb", buffering=0) as f:
            while piece := f.read(chunk):
                out += piece
        results[n] = bytes(out)
    threads = [threading.Thread(target=reader, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == [0, 1, 2, 3]
    assert all(r == data for r in results.values())


def test_corrupt_block_on_disk_is_fetched_again(reading, local_minerva):
    make, cache = reading
    data = os.urandom(4 * MIB)
    local_minerva.put("Outgoing/c.bin", data)
    mount = make()
    assert (mount.path / "Outgoing" / "c.bin").read_bytes() == data
    wait_for(cached_after_reading(mount.path / "Outgoing" / "c.bin", cache, 4),
             "4 blocks written to the cache")
    assert mount.unmount() == 0
    names = block_files(cache)
    with open(names[0], "r+b") as f:  # flip bytes in the middle of one block
        f.seek(300_000)
        chunk = f.read(16)
        f.seek(300_000)
        f.write(bytes(b ^ 0x5A for b in chunk))
    with open(names[-1], "r+b") as f:  # and cut another short
        f.truncate(1000)
    again = make("again")
    assert (again.path / "Outgoing" / "c.bin").read_bytes() == data
    assert "dropped corrupt" in again.log()


def test_object_replaced_in_s3_serves_new_bytes_once_attributes_refresh(reading, local_minerva):
    make, _ = reading
    old, new = os.urandom(3 * MIB), os.urandom(3 * MIB)  # same size: only the ETag tells
    local_minerva.put("Outgoing/report.bin", old)
    mount = make()
    path = mount.path / "Outgoing" / "report.bin"
    assert path.read_bytes() == old
    assert path.read_bytes() == old  # kept page cache, same bytes
    local_minerva.put("Outgoing/report.bin", new)

    def read_new():
        got = path.read_bytes()
        assert got in (old, new), "a mix of old and new bytes was served"
        return got == new
    wait_for(read_new, "the replaced object's bytes")
    assert path.read_bytes() == new
