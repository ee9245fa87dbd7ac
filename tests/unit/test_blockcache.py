"""Unit tests of the on-disk block cache and of the block reader over FakeStore."""

import errno
import os
import stat

import pytest
import trio
import trio.testing

from minerva_mount import blockcache
from minerva_mount.blockcache import BlockCache, data_offset, parse_size, run_file_size
from minerva_mount.core import Core
from minerva_mount.errors import StoreError
from minerva_mount.fakestore import FakeStore
from minerva_mount.reader import GET_SIZE, MAX_PENDING_WRITES, Blocks, Reader
from minerva_mount.safepaths import UnsafePath
from minerva_mount.store import ObjectChanged

BS = 64 * 1024  # small blocks keep the data small


class RangeStore(FakeStore):
    """FakeStore that records every ranged GET, to check what the reader asked for."""

    def __init__(self):
        super().__init__()
        self.ranges: list[tuple[str, int, int]] = []

    async def get_range(self, path, start, end, etag=None):
        self.ranges.append((path, start, end))
        return await super().get_range(path, start, end, etag)


def data_of(size: int, seed: int = 1) -> bytes:
    return bytes((i * 31 + seed) % 251 for i in range(size))


def run(test, tmp_path, max_bytes=1 << 30):
    """Run `test(blocks, store, cache)` with a fresh cache over `tmp_path`."""
    async def main():
        store = RangeStore()
        cache = BlockCache(tmp_path, max_bytes, block_size=BS)
        await cache.open()
        async with trio.open_nursery() as nursery:
            await test(Blocks(store, nursery, cache), store, cache)
            nursery.cancel_scope.cancel()
    trio.run(main)


async def read_all(blocks, info, chunk=16 * 1024) -> bytes:
    reader, out = Reader(blocks, info), bytearray()
    while piece := await reader.read(len(out), chunk):
        out += piece
    return bytes(out)


async def settle(blocks: Blocks) -> None:
    """Wait until fetched blocks are on disk (they are written in the background)."""
    with trio.fail_after(10):
        while blocks.pending_writes:
            await trio.sleep(0.01)


def block_files(tmp_path) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files)


def last_block_offset(path) -> int:
    """Where the last block of a run file (named <object>-<first>-<count>) starts."""
    count = int(os.path.basename(path).rsplit("-", 1)[1])
    return data_offset(count) + (count - 1) * BS


def test_parse_size():
    assert parse_size("512M") == 512 << 20
    assert parse_size("10G") == 10 << 30
    assert parse_size("10GiB") == 10 << 30
    assert parse_size("4096") == 4096
    with pytest.raises(ValueError):
        parse_size("lots")


def test_sequential_read_equals_object_and_fetches_ahead_in_few_gets(tmp_path):
    async def test(blocks, store, cache):
        data = data_of(40 * BS + 123)
        info = store.add("Outgoing/big.bin", data)
        assert await read_all(blocks, info) == data
        # Readahead fetches runs of blocks: far fewer GETs than blocks, and no byte twice.
        assert len(store.ranges) < 20
        fetched = sorted((s, e) for _, s, e in store.ranges[1:])  # after the first small read
        assert all(a[1] <= b[0] for a, b in zip(fetched, fetched[1:], strict=False))
    run(test, tmp_path)


def test_reads_at_and_beyond_eof(tmp_path):
    async def test(blocks, store, cache):
        data = data_of(3 * BS + 10)
        info = store.add("Outgoing/f.bin", data)
        reader = Reader(blocks, info)
        assert await reader.read(len(data) - 5, 100) == data[-5:]
        assert await reader.read(len(data), 100) == b""
        assert await reader.read(len(data) + BS, 100) == b""
        assert await reader.read(BS - 7, 20) == data[BS - 7:BS + 13]  # across a block edge
        assert await reader.read(0, 4 * BS) == data  # several blocks in one read
    run(test, tmp_path)


def test_small_read_fetches_only_its_block_and_seek_resets_window(tmp_path):
    async def test(blocks, store, cache):
        data = data_of(100 * BS)
        info = store.add("Outgoing/video.bin", data)
        reader = Reader(blocks, info, max_window=8 * BS)
        assert await reader.read(0, 16 * 1024) == data[:16 * 1024]
        assert store.ranges == [("Outgoing/video.bin", 0, 16 * 1024)]  # just what was asked
        for offset in range(16 * 1024, 8 * BS, 16 * 1024):  # sequential: the window grows
            await reader.read(offset, 16 * 1024)
        await trio.testing.wait_all_tasks_blocked()
        assert max(e for _, _, e in store.ranges) > 8 * BS
        store.ranges.clear()
        far = 90 * BS + 5
        assert await reader.read(far, 1000) == data[far:far + 1000]  # a seek: only that block
        await trio.testing.wait_all_tasks_blocked()
        assert store.ranges == [("Outgoing/video.bin", far, far + 1000)]
    run(test, tmp_path)


def test_memory_stays_within_its_budget(tmp_path):
    async def test(blocks, store, cache):
        blocks.memory_bytes = 4 * BS
        data = data_of(64 * BS)
        info = store.add("Outgoing/m.bin", data)
        reader, out = Reader(blocks, info, max_window=4 * BS), bytearray()
        while piece := await reader.read(len(out), 16 * 1024):
            out += piece
            assert blocks._memory_used <= 4 * BS + GET_SIZE
        assert bytes(out) == data
        await trio.testing.wait_all_tasks_blocked()
        assert blocks._memory_used <= 4 * BS
    run(test, tmp_path)


def test_concurrent_readers_share_blocks(tmp_path):
    async def test(blocks, store, cache):
        data = data_of(30 * BS)
        info = store.add("Outgoing/shared.bin", data)
        results = []

        async def one():
            results.append(await read_all(blocks, info, chunk=BS))
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(one)
        assert results == [data] * 4
        assert sum(e - s for _, s, e in store.ranges) == len(data)  # every byte fetched once
    run(test, tmp_path)


def test_blocks_survive_restart_and_files_are_private(tmp_path):
    data = data_of(5 * BS)

    async def first(blocks, store, cache):
        info = store.add("Outgoing/keep.bin", data)
        assert await read_all(blocks, info) == data
        await settle(blocks)
    run(first, tmp_path)

    async def second(blocks, store, cache):
        info = store.add("Outgoing/keep.bin", data)
        assert len(cache._index) == 5
        assert await read_all(blocks, info) == data
        assert store.ranges == []  # all from disk
    run(second, tmp_path)
    for path in block_files(tmp_path):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    for folder, _, _ in os.walk(tmp_path / "blocks-65536"):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700


def test_eviction_by_bytes_keeps_recent_blocks(tmp_path):
    cap = 4 * run_file_size([BS])

    async def test(blocks, store, cache):
        names = [BlockCache.name("Outgoing/big.bin", "etag1", i) for i in range(10)]
        for index in range(4):
            await cache.put(names[index], data_of(BS, seed=index))
        assert await cache.get(names[0]) == data_of(BS, seed=0)  # now the most recent
        await cache.put(names[4], data_of(BS, seed=4))
        assert cache.has(names[0]) and not cache.has(names[1])  # least recently used went
        for index in range(5, 10):
            await cache.put(names[index], data_of(BS, seed=index))
            assert cache.used <= cap
        assert set(cache._index) == set(names[6:])
        assert sum(os.path.getsize(p) for p in block_files(tmp_path)) <= cap
    run(test, tmp_path, max_bytes=cap)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_block_is_dropped_and_fetched_again(tmp_path, damage):
    data = data_of(3 * BS)

    async def fill(blocks, store, cache):
        info = store.add("Outgoing/c.bin", data)
        assert await read_all(blocks, info) == data
        await settle(blocks)
    run(fill, tmp_path)
    victim = block_files(tmp_path)[0]
    at = last_block_offset(victim)
    with open(victim, "r+b") as f:
        if damage == "flip":
            f.seek(at + 1000)
            byte = f.read(1)
            f.seek(at + 1000)
            f.write(bytes([byte[0] ^ 0xFF]))
        else:
            f.truncate(at + 100)

    async def check(blocks, store, cache):
        info = store.add("Outgoing/c.bin", data)
        assert await read_all(blocks, info) == data
        assert len(store.ranges) == 1  # just the damaged block again
        assert cache.dropped_corrupt == 1
    run(check, tmp_path)


def test_changed_etag_never_serves_old_bytes(tmp_path):
    async def test(blocks, store, cache):
        old = data_of(3 * BS, seed=1)
        info = store.add("Outgoing/r.bin", old)
        assert await read_all(blocks, info) == old
        await settle(blocks)
        new = data_of(3 * BS, seed=2)
        info2 = store.add("Outgoing/r.bin", new)
        assert info2.etag != info.etag
        assert await read_all(blocks, info2) == new
    run(test, tmp_path)


def test_object_replaced_after_open_reads_new_version_until_bytes_were_served(tmp_path):
    async def test(blocks, store, cache):
        old, new = data_of(3 * BS, seed=1), data_of(3 * BS, seed=2)
        opened = store.add("Outgoing/v.bin", old)
        store.add("Outgoing/v.bin", new)  # replaced before the first read
        assert await read_all(blocks, opened) == new
        reader = Reader(blocks, store.add("Outgoing/w.bin", old))
        assert await reader.read(0, 100) == old[:100]
        store.add("Outgoing/w.bin", new)
        with pytest.raises(ObjectChanged):
            await reader.read(2 * BS, 100)  # no mix of versions in one handle
    run(test, tmp_path)


def test_core_keeps_page_cache_only_while_etag_unchanged(tmp_path):
    async def main():
        store = FakeStore()
        store.add("Outgoing/p.bin", b"one")
        changed = []
        async with trio.open_nursery() as nursery:
            core = Core(store, nursery)
            core.on_changed = changed.append
            outgoing = (await core.lookup(1, b"Outgoing")).inode
            inode = (await core.lookup(outgoing, b"p.bin")).inode
            first = await core.open(inode, os.O_RDONLY)
            second = await core.open(inode, os.O_RDONLY)
            assert not core.handles[first].keep_cache  # nothing cached yet
            assert core.handles[second].keep_cache
            store.add("Outgoing/p.bin", b"two!")
            core.listings.clear()  # as when the listing's TTL has passed
            await core.lookup(outgoing, b"p.bin")
            assert changed == [inode]
            third = await core.open(inode, os.O_RDONLY)
            assert not core.handles[third].keep_cache
            assert await core.read(third, 0, 100) == b"two!"
            nursery.cancel_scope.cancel()
    trio.run(main)


def test_runs_hold_consecutive_blocks_and_a_damaged_one_stays_dropped_after_restart(tmp_path):
    data = data_of(24 * BS + 5)

    async def fill(blocks, store, cache):
        info = store.add("Outgoing/run.bin", data)
        with trio.fail_after(30):
            while len(cache._index) < 25:  # a run whose write was skipped (disk behind) is
                for name in list(blocks._memory):  # fetched and written again on the next read
                    blocks._forget(name)
                assert await read_all(blocks, info, chunk=BS) == data
                await settle(blocks)
    run(fill, tmp_path)
    files = block_files(tmp_path)
    assert len(files) < 25  # one file per GET, not per block
    victim = max(files, key=lambda p: int(p.rsplit("-", 1)[1]))  # the run with most blocks
    first, count = (int(n) for n in os.path.basename(victim).split("-")[1:])
    assert count > 2
    middle = data_offset(count) + BS + 7  # inside the run's second block
    with open(victim, "r+b") as f:
        f.seek(middle)
        byte = f.read(1)
        f.seek(middle)
        f.write(bytes([byte[0] ^ 0x01]))

    async def damaged(blocks, store, cache):
        info = store.add("Outgoing/run.bin", data)
        assert await read_all(blocks, info, chunk=BS) == data
        assert cache.dropped_corrupt == 1
        fetched = [(s, e) for _, s, e in store.ranges]
        assert fetched == [((first + 1) * BS, (first + 2) * BS)]  # that block alone, again
        await settle(blocks)
    run(damaged, tmp_path)

    async def restarted(blocks, store, cache):
        info = store.add("Outgoing/run.bin", data)
        assert len(cache._index) == 25  # the new copy, not the damaged one
        assert await read_all(blocks, info, chunk=BS) == data
        assert store.ranges == [] and cache.dropped_corrupt == 0
    run(restarted, tmp_path)


class FailingStore(RangeStore):
    """With `fail`, every GET fails after S3Store's retries (the body was cut each time)."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.fail = fail

    async def get_blocks(self, path, start, end, block_size, etag=None):
        if self.fail:
            raise StoreError(f"get {path}: S3 unreachable")
        return await super().get_blocks(path, start, end, block_size, etag)


@pytest.mark.parametrize("fail", [False, True])
def test_a_completed_get_is_cached_as_one_run_and_a_failed_one_leaves_nothing(tmp_path, fail):
    data = data_of(6 * BS)

    async def main():
        store = FailingStore(fail)
        info = store.add("Outgoing/retry.bin", data)
        cache = BlockCache(tmp_path, 1 << 30, block_size=BS)
        await cache.open()
        async with trio.open_nursery() as nursery:
            blocks = Blocks(store, nursery, cache)
            if fail:
                with pytest.raises(StoreError):
                    await blocks.get_exact(info, 0, len(data))
            else:
                assert await blocks.get_exact(info, 0, len(data)) == data
            await settle(blocks)
            nursery.cancel_scope.cancel()
    trio.run(main)
    files = block_files(tmp_path)
    assert len(files) == (0 if fail else 1)  # no .tmp file left behind

    async def again(blocks, store, cache):
        info = store.add("Outgoing/retry.bin", data)
        assert len(cache._index) == (0 if fail else 6)
        assert await read_all(blocks, info, chunk=BS) == data
        assert (store.ranges == []) != fail  # all from disk, unless nothing was cached
    run(again, tmp_path)


def test_reads_go_on_when_the_cache_writes_fall_behind(tmp_path):
    """Cache writes run at idle priority; on a saturated machine they stall. Reads must not
    wait for them: beyond MAX_PENDING_WRITES runs, fetched blocks are served and not cached."""
    data = data_of(6 * BS)

    async def main():
        store = RangeStore()
        info = store.add("Outgoing/slow.bin", data)
        cache = BlockCache(tmp_path, 1 << 30, block_size=BS)
        await cache.open()
        release = trio.Event()

        async def stalled(blocks):
            await release.wait()
        cache.put_many = stalled
        async with trio.open_nursery() as nursery:
            blocks = Blocks(store, nursery, cache)
            with trio.fail_after(10):
                for i in range(6):
                    assert await blocks.get_exact(info, i * BS, (i + 1) * BS) == data[i * BS:(i + 1) * BS]
            assert blocks.pending_writes == MAX_PENDING_WRITES
            assert blocks.stats()["skipped_writes"] == 6 - MAX_PENDING_WRITES
            release.set()
            await settle(blocks)
            nursery.cancel_scope.cancel()
    trio.run(main)


def test_a_block_whose_write_was_skipped_is_written_when_used_again(tmp_path):
    """A run skipped while the writer was behind is still in memory; the next use of one of its
    blocks writes it (the writer has room again): a busy spell loses no block for good."""
    data = data_of(6 * BS)

    async def main():
        store = RangeStore()
        info = store.add("Outgoing/slow.bin", data)
        cache = BlockCache(tmp_path, 1 << 30, block_size=BS)
        await cache.open()
        release = trio.Event()
        written: list[str] = []
        real_put_many = cache.put_many

        async def stalled_then_real(blocks):
            await release.wait()
            written.extend(name for name, _ in blocks)
            await real_put_many(blocks)
        cache.put_many = stalled_then_real
        async with trio.open_nursery() as nursery:
            blocks = Blocks(store, nursery, cache)
            for i in range(6):
                await blocks.get(info, i)
            assert blocks.stats()["skipped_writes"] == 6 - MAX_PENDING_WRITES
            release.set()
            await settle(blocks)
            gets = store.requests["get"]
            for i in range(6):  # used again: served from memory, the skipped ones written now
                assert bytes(await blocks.get(info, i)) == data[i * BS:(i + 1) * BS]
            await settle(blocks)
            assert store.requests["get"] == gets  # no GET: they were at hand
            assert set(written) == {BlockCache.name(info.path, info.etag, i) for i in range(6)}
            assert all(cache.has(BlockCache.name(info.path, info.etag, i)) for i in range(6))
            nursery.cancel_scope.cancel()
    trio.run(main)


# ----- a shared cache folder: planted symlinks and files are never used -------------------

STRANGER = 65534  # nobody
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another uid needs root")


def plant_run(tmp_path, path: str, real: bytes, evil: bytes) -> str:
    """A valid run file holding `evil` under the block names of `real` (same path and ETag),
    written by a cache in tmp_path/evil: the path of that file."""
    names = [BlockCache.name(path, FakeStore().add(path, real).etag, i) for i in range(len(real) // BS)]

    async def main():
        cache = BlockCache(tmp_path / "evil", 1 << 30, block_size=BS)
        await cache.open()
        await cache.put_many([(name, evil[i * BS:(i + 1) * BS]) for i, name in enumerate(names)])
        cache.close()
    trio.run(main)
    [planted] = block_files(tmp_path / "evil")
    return planted


@pytest.mark.parametrize("how", ["file-symlink", "file-writable-by-others", "folder-symlink",
                                 pytest.param("file-of-stranger", marks=as_root),
                                 pytest.param("folder-of-stranger", marks=as_root)])
def test_a_planted_run_file_is_never_served(tmp_path, how):
    data, evil = data_of(4 * BS, seed=1), data_of(4 * BS, seed=7)
    planted = plant_run(tmp_path, "Outgoing/p.bin", data, evil)
    sub, name = os.path.basename(os.path.dirname(planted)), os.path.basename(planted)
    root = tmp_path / "blocks-65536"
    root.mkdir(mode=0o700)
    target = root / sub / name
    if how == "folder-symlink":
        (root / sub).symlink_to(os.path.dirname(planted))
    else:
        (root / sub).mkdir(mode=0o700)
        if how == "file-symlink":
            target.symlink_to(planted)
        else:
            os.rename(planted, target)
            if how == "file-writable-by-others":
                target.chmod(0o666)
            elif how == "file-of-stranger":
                os.chown(target, STRANGER, STRANGER)
            else:
                os.chown(root / sub, STRANGER, STRANGER)

    async def test(blocks, store, cache):
        assert cache._index == {}
        info = store.add("Outgoing/p.bin", data)
        assert await read_all(blocks, info, chunk=BS) == data
        assert store.ranges  # from S3, not from the planted file
    run(test, tmp_path)
    assert not os.path.lexists(target) or os.lstat(target).st_uid == os.geteuid()  # removed
    if how == "file-symlink":
        assert os.path.exists(planted)  # what it pointed to: untouched


def test_a_run_file_that_became_writable_by_others_is_not_served(tmp_path):
    """Checked at each read too, not only at start."""
    data = data_of(3 * BS)

    async def test(blocks, store, cache):
        info = store.add("Outgoing/w.bin", data)
        assert await read_all(blocks, info, chunk=BS) == data
        await settle(blocks)
        assert len(cache._index) == 3
        for path in block_files(tmp_path):
            os.chmod(path, 0o666)
        for name in list(blocks._memory):
            blocks._forget(name)
        store.ranges.clear()
        assert await read_all(blocks, info, chunk=BS) == data
        assert sum(e - s for _, s, e in store.ranges) == len(data)  # all fetched again
        assert cache.dropped_corrupt == 3
    run(test, tmp_path)


def test_a_symlinked_blocks_folder_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o755)
    victim.chmod(0o755)
    (tmp_path / "blocks-65536").symlink_to(victim)

    async def main():
        cache = BlockCache(tmp_path, 1 << 30, block_size=BS)
        with pytest.raises(UnsafePath, match=f"{tmp_path / 'blocks-65536'} is a symlink"):
            await cache.open()
    trio.run(main)
    assert stat.S_IMODE(victim.stat().st_mode) == 0o755 and os.listdir(victim) == []


@as_root
def test_a_blocks_folder_of_another_user_is_refused(tmp_path):
    (tmp_path / "blocks-65536").mkdir(mode=0o700)
    os.chown(tmp_path / "blocks-65536", STRANGER, STRANGER)

    async def main():
        with pytest.raises(UnsafePath, match=f"is owned by uid {STRANGER}, not you"):
            await BlockCache(tmp_path, 1 << 30, block_size=BS).open()
    trio.run(main)


# ----- a full disk only stops caching -------------------------------------------------------

def fail_writes(monkeypatch, how: str) -> None:
    """os.pwrite as on a full disk: ENOSPC, or a write that writes nothing."""
    def pwrite(fd, data, offset):
        if how == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return 0
    monkeypatch.setattr(blockcache.os, "pwrite", pwrite)


@pytest.mark.parametrize("how", ["enospc", "nothing-written"])
def test_a_full_disk_only_stops_caching(tmp_path, monkeypatch, caplog, how):
    first, second, third = (data_of(3 * BS, seed=s) for s in (1, 2, 3))

    async def test(blocks, store, cache):
        fail_writes(monkeypatch, how)
        cache.write_pause = 0  # try every run: the warning still comes once
        for index, data in enumerate((first, second)):
            info = store.add(f"Outgoing/{index}.bin", data)
            assert await read_all(blocks, info, chunk=BS) == data
            await settle(blocks)
        assert cache._index == {} and block_files(tmp_path) == []  # no .tmp file left behind
        assert cache.write_failures >= 2 and cache.write_error  # a run per GET, each failed
        warnings = [r for r in caplog.records if r.levelname == "WARNING" and "cannot write" in r.message]
        assert len(warnings) == 1 and str(tmp_path / "blocks-65536") in warnings[0].message

        cache.write_pause = 3600  # after this failure, runs are not even tried for an hour
        await read_all(blocks, store.add("Outgoing/2.bin", third), chunk=BS)
        await settle(blocks)
        failures = cache.write_failures
        assert cache._index == {} and cache._paused_until > 0
        assert await read_all(blocks, store.add("Outgoing/3.bin", third[::-1]), chunk=BS) == third[::-1]
        await settle(blocks)
        assert cache.write_failures == failures and cache._index == {}  # paused: not tried

        monkeypatch.undo()  # room again, and the pause is over
        cache._paused_until = 0
        info = store.add("Outgoing/0.bin", first)
        for name in list(blocks._memory):
            blocks._forget(name)
        assert await read_all(blocks, info, chunk=BS) == first
        await settle(blocks)
        assert len(cache._index) == 3 and cache.write_error is None
        assert any("writing to" in r.message for r in caplog.records)
    caplog.set_level("INFO", logger="minerva.blockcache")
    run(test, tmp_path)


def test_short_writes_go_on_where_they_stopped(tmp_path, monkeypatch):
    real = os.pwrite
    monkeypatch.setattr(blockcache.os, "pwrite", lambda fd, data, offset: real(fd, data[:1000], offset))
    data = data_of(3 * BS + 17)

    async def fill(blocks, store, cache):
        assert await read_all(blocks, store.add("Outgoing/s.bin", data), chunk=BS) == data
        await settle(blocks)
        assert len(cache._index) == 4 and cache.write_failures == 0
    run(fill, tmp_path)
    monkeypatch.undo()

    async def again(blocks, store, cache):
        assert await read_all(blocks, store.add("Outgoing/s.bin", data), chunk=BS) == data
        assert store.ranges == []  # all from disk, intact
    run(again, tmp_path)
