"""Unit tests of the core, driven without a kernel over the in-memory FakeStore."""

import errno
import os

import pytest
import trio
import trio.testing

from minerva_mount.core import Core
from minerva_mount.errors import MinervaError
from minerva_mount.fakestore import FakeStore
from minerva_mount.multipart import MIN_PART, part_size
from minerva_mount.namespace import ROOT_INODE

WRITE_NEW = os.O_WRONLY | os.O_CREAT | os.O_TRUNC


def run(test, store=None):
    """Run `test(core, store)` inside a nursery that owns the core's background tasks."""
    async def main(store=store):
        store = store or FakeStore()
        async with trio.open_nursery() as nursery:
            await test(Core(store, nursery), store)
            nursery.cancel_scope.cancel()
    trio.run(main)


async def inode_of(core, path: str) -> int:
    inode = ROOT_INODE
    for part in path.split("/"):
        inode = (await core.lookup(inode, part.encode())).inode
    return inode


async def write_file(core, path: str, data: bytes, chunk: int = 128 * 1024) -> None:
    parent, name = path.rsplit("/", 1)
    fh, _ = await core.create(await inode_of(core, parent), name.encode(), WRITE_NEW)
    for offset in range(0, len(data), chunk):
        await core.write(fh, offset, data[offset:offset + chunk])
    await core.flush(fh)
    await core.release(fh)


async def read_file(core, path: str, chunk: int = 128 * 1024) -> bytes:
    fh = await core.open(await inode_of(core, path), os.O_RDONLY)
    out, offset = bytearray(), 0
    while piece := await core.read(fh, offset, chunk):
        out += piece
        offset += len(piece)
    await core.release(fh)
    return bytes(out)


def listing(core, fh) -> list[str]:
    return [name for name, _ in core.readdir(fh, 0)]


async def expect_errno(code: int, coro):
    with pytest.raises(MinervaError) as info:
        await coro
    assert info.value.errno == code, info.value


def test_root_always_shows_incoming_and_outgoing():
    async def test(core, store):
        fh = await core.opendir(ROOT_INODE)
        assert listing(core, fh) == ["Incoming", "Outgoing"]
        store.add("Archive/old.csv", b"x")
        core.listings.clear()
        assert listing(core, await core.opendir(ROOT_INODE)) == ["Archive", "Incoming", "Outgoing"]
    run(test)


def test_small_file_appears_whole_at_close_with_one_put():
    async def test(core, store):
        fh, _ = await core.create(await inode_of(core, "Incoming"), b"a.csv", WRITE_NEW)
        await core.write(fh, 0, b"hello ")
        await core.write(fh, 6, b"world")
        assert "Incoming/a.csv" not in store.objects
        await core.flush(fh)
        await core.release(fh)
        assert store.objects["Incoming/a.csv"][0] == b"hello world"
        assert store.requests["put"] == 1 and store.requests["create_multipart"] == 0
    run(test)


def test_large_file_goes_up_in_parts_and_appears_only_at_close():
    data = os.urandom(2 * MIN_PART + 12345)

    async def test(core, store):
        fh, _ = await core.create(await inode_of(core, "Incoming"), b"big.bin", WRITE_NEW)
        for offset in range(0, len(data), 1 << 20):
            await core.write(fh, offset, data[offset:offset + (1 << 20)])
        assert "Incoming/big.bin" not in store.objects
        await core.flush(fh)
        await core.release(fh)
        assert store.objects["Incoming/big.bin"][0] == data
        assert store.requests["upload_part"] == 3
        assert await read_file(core, "Incoming/big.bin") == data
    run(test)


def test_part_size_reaches_5_tib_in_10000_parts():
    assert sum(part_size(n) for n in range(1, 10_001)) >= 5 << 40
    assert part_size(10_000) <= 5 << 30


def test_failed_part_fails_close_with_eio_and_publishes_nothing():
    async def test(core, store):
        store.fail_kinds.add("upload_part")
        fh, _ = await core.create(await inode_of(core, "Incoming"), b"f.bin", WRITE_NEW)
        data = os.urandom(MIN_PART + 1)
        await core.write(fh, 0, data)
        await expect_errno(errno.EIO, core.flush(fh))
        await core.release(fh)
        assert "Incoming/f.bin" not in store.objects
        await expect_errno(errno.ENOENT, core.lookup(await inode_of(core, "Incoming"), b"f.bin"))
    run(test)


def test_writes_outside_incoming_are_refused_and_leave_nothing():
    async def test(core, store):
        await expect_errno(errno.EACCES, core.create(await inode_of(core, "Outgoing"), b"x", WRITE_NEW))
        await expect_errno(errno.EACCES, core.create(ROOT_INODE, b"x", WRITE_NEW))
        await expect_errno(errno.EACCES, core.mkdir(ROOT_INODE, b"new"))
        await expect_errno(errno.EACCES, core.rmdir(ROOT_INODE, b"Incoming"))
        assert store.objects == {}
    run(test)


def test_pending_file_is_listed_while_written():
    async def test(core, store):
        incoming = await inode_of(core, "Incoming")
        fh, _ = await core.create(incoming, b"w.txt", WRITE_NEW)
        await core.write(fh, 0, b"abc")
        assert listing(core, await core.opendir(incoming)) == ["w.txt"]
        assert (await core.getattr(await inode_of(core, "Incoming/w.txt"))).size == 3
        await core.flush(fh)
        await core.release(fh)
    run(test)


def test_reads_are_ranged_and_stop_at_eof():
    data = os.urandom(3 * 1024 * 1024 + 7)

    async def test(core, store):
        store.add("Outgoing/export.bin", data)
        inode = await inode_of(core, "Outgoing/export.bin")
        fh = await core.open(inode, os.O_RDONLY)
        assert await core.read(fh, 1000, 5000) == data[1000:6000]
        assert await core.read(fh, len(data) - 3, 100) == data[-3:]
        assert await core.read(fh, len(data) + 10, 100) == b""
        await core.release(fh)
        assert await read_file(core, "Outgoing/export.bin") == data
    run(test)


def test_mkdir_rmdir_and_unlink():
    async def test(core, store):
        incoming = await inode_of(core, "Incoming")
        node = await core.mkdir(incoming, b"sub")
        assert "Incoming/sub/" in store.objects
        await write_file(core, "Incoming/sub/f.txt", b"1")
        await expect_errno(errno.ENOTEMPTY, core.rmdir(incoming, b"sub"))
        await core.unlink(node.inode, b"f.txt")
        await core.rmdir(incoming, b"sub")
        assert store.objects == {}
        outgoing = await inode_of(core, "Outgoing")
        await core.mkdir(outgoing, b"o")
        await core.rmdir(outgoing, b"o")
    run(test)


def test_rename_file_and_folder_by_server_side_copy():
    async def test(core, store):
        await write_file(core, "Incoming/a.txt", b"A")
        incoming = await inode_of(core, "Incoming")
        await core.rename(incoming, b"a.txt", incoming, b"b.txt")
        assert set(store.objects) == {"Incoming/b.txt"}
        await core.mkdir(incoming, b"d")
        await write_file(core, "Incoming/d/x", b"X")
        await core.rename(incoming, b"d", incoming, b"e")
        assert set(store.objects) == {"Incoming/b.txt", "Incoming/e/", "Incoming/e/x"}
        assert await read_file(core, "Incoming/e/x") == b"X"
    run(test)


def test_names_s3_cannot_take_are_refused():
    async def test(core, store):
        incoming = await inode_of(core, "Incoming")
        await expect_errno(errno.ENAMETOOLONG, core.create(incoming, b"n" * 256, WRITE_NEW))
        await expect_errno(errno.EINVAL, core.create(incoming, b"\xff\xfe.bin", WRITE_NEW))
        assert store.objects == {}
    run(test)


def test_unusable_object_names_are_hidden_not_fatal():
    async def test(core, store):
        store.add("Outgoing/" + "x" * 300, b"long")
        store.add("Outgoing/ok.txt", b"ok")
        assert listing(core, await core.opendir(await inode_of(core, "Outgoing"))) == ["ok.txt"]
    run(test)


def test_a_listing_that_started_before_a_publish_is_not_cached():
    """A LIST answered before a file was published must not hide that file afterwards."""
    async def test(core, store):
        incoming = await inode_of(core, "Incoming")
        await trio.testing.wait_all_tasks_blocked()  # the lookup's list-ahead of Incoming is done
        # Opened before the LIST starts: a create in the same folder would wait for that
        # LIST (one LIST in flight per folder) rather than list again.
        fh_new, _ = await core.create(incoming, b"new.txt", WRITE_NEW)
        started, release = trio.Event(), trio.Event()
        list_dir = store.list_dir

        async def slow_list(path):
            listing = await list_dir(path)  # the answer as of now, before the publish
            if not started.is_set():  # only the first LIST is slow
                started.set()
                await release.wait()
            return listing

        store.list_dir = slow_list
        async with trio.open_nursery() as inner:
            core.listings.forget("Incoming")
            inner.start_soon(core.opendir, incoming)
            await started.wait()
            await core.write(fh_new, 0, b"new")
            await core.flush(fh_new)  # publishes while the LIST is under way
            await core.release(fh_new)
            release.set()
        store.list_dir = list_dir
        fh = await core.opendir(incoming)
        assert "new.txt" in [name for name, _ in core.readdir(fh, 0)]
    run(test)
