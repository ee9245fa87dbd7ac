"""Unit tests of staging files and temporary names, over the in-memory FakeStore."""

import errno
import os

import pytest
import trio
import trio.testing

from minerva_mount import staging
from minerva_mount.core import Core
from minerva_mount.errors import MinervaError
from minerva_mount.fakestore import FakeStore
from minerva_mount.multipart import MAX_INFLIGHT, MIN_PART
from minerva_mount.namespace import ROOT_INODE, is_temporary
from minerva_mount.staging import BLOCK, StagingArea
from minerva_mount.store import MTIME_META

WRITE_NEW = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
MIB = 1 << 20


@pytest.fixture
def run(tmp_path):
    staging = tmp_path / "staging"

    def runner(test):
        async def main():
            store = FakeStore()
            async with trio.open_nursery() as nursery:
                staging.mkdir(mode=0o700, exist_ok=True)
                area = StagingArea(os.open(staging, os.O_RDONLY | os.O_DIRECTORY))
                core = Core(store, nursery, staging=area)
                await test(core, store)
                assert not [f for f in core.files if f.opens]
                nursery.cancel_scope.cancel()
        trio.run(main)
        assert oct(staging.stat().st_mode & 0o777) == "0o700"
        assert os.listdir(staging) == []  # staging files have no name (O_TMPFILE)
    return runner


async def inode_of(core, path: str) -> int:
    inode = ROOT_INODE
    for part in path.split("/"):
        inode = (await core.lookup(inode, part.encode())).inode
    return inode


async def close(core, fh) -> None:
    await core.flush(fh)
    await core.release(fh)


async def create(core, path: str, flags: int = WRITE_NEW) -> int:
    parent, name = path.rsplit("/", 1)
    fh, _ = await core.create(await inode_of(core, parent), name.encode(), flags)
    return fh


async def read_all(core, fh, size: int) -> bytes:
    return await core.read(fh, 0, size)


@pytest.mark.parametrize("name", [
    "report.pdf.part", ".goutputstream-A1b2C3", ".notes.txt.swp", ".notes.txt.swo", ".v.txt.swx", "4913",
    "notes.txt~",
    ".data.csv.Xy12Zq", ".~lock.budget.ods#", "~$budget.docx"])
def test_temporary_names(name):
    assert is_temporary("Incoming/sub/" + name)


@pytest.mark.parametrize("name", [
    "report.pdf", "part", ".bashrc", "data.csv", ".goutputstream-ABC", "a.swp", "~budget.docx",
    "file.partial", ".hidden", ".notes.backup", ".config.yamlxx"])
def test_final_names(name):
    assert not is_temporary("Incoming/" + name)


def test_in_place_change_fetches_only_the_blocks_it_touches(run):
    data = os.urandom(5 * BLOCK + 100)

    async def test(core, store):
        store.add("Incoming/big.bin", data)
        fh = await core.open(await inode_of(core, "Incoming/big.bin"), os.O_RDWR)
        await core.write(fh, 2 * BLOCK + 5, b"XYZ")
        assert store.requests["get"] == 1  # one block, around the change
        assert await core.read(fh, 2 * BLOCK, 10) == data[2 * BLOCK:2 * BLOCK + 5] + b"XYZ" + \
            data[2 * BLOCK + 8:2 * BLOCK + 10]
        assert store.objects["Incoming/big.bin"][0] == data  # unchanged until close
        await close(core, fh)
        expected = data[:2 * BLOCK + 5] + b"XYZ" + data[2 * BLOCK + 8:]
        assert store.objects["Incoming/big.bin"][0] == expected
        assert store.requests["put"] == 1
    run(test)


def test_append_truncate_and_overwrite(run):
    async def test(core, store):
        store.add("Incoming/a.txt", b"hello world\n")
        inode = await inode_of(core, "Incoming/a.txt")
        fh = await core.open(inode, os.O_WRONLY | os.O_APPEND)
        await core.write(fh, 12, b"more\n")
        await close(core, fh)
        assert store.objects["Incoming/a.txt"][0] == b"hello world\nmore\n"
        await core.setattr(inode, size=5)  # truncate by path: shrink
        assert store.objects["Incoming/a.txt"][0] == b"hello"
        await core.setattr(inode, size=8)  # grow: zeros, not the old bytes
        assert store.objects["Incoming/a.txt"][0] == b"hello\0\0\0"
        fh = await core.open(inode, os.O_RDWR | os.O_TRUNC)
        await core.write(fh, 0, b"new")
        await close(core, fh)
        assert store.objects["Incoming/a.txt"][0] == b"new"
    run(test)


def test_two_handles_share_one_staging_file_and_publish_once(run):
    async def test(core, store):
        store.add("Incoming/s.txt", b"0123456789")
        inode = await inode_of(core, "Incoming/s.txt")
        a = await core.open(inode, os.O_RDWR)
        b = await core.open(inode, os.O_RDWR)
        reader = await core.open(inode, os.O_RDONLY)
        await core.write(a, 0, b"AA")
        assert await core.read(b, 0, 10) == b"AA23456789"
        await core.write(b, 8, b"BB")
        assert await core.read(reader, 0, 10) == b"AA234567BB"
        await close(core, a)  # b still writes: nothing sent yet
        assert store.objects["Incoming/s.txt"][0] == b"0123456789"
        await close(core, b)
        assert store.objects["Incoming/s.txt"][0] == b"AA234567BB"
        assert store.requests["put"] == 1
        await close(core, reader)
    run(test)


def test_temporary_name_is_kept_local_until_renamed(run):
    async def test(core, store):
        fh = await create(core, "Incoming/.goutputstream-ABC123")
        await core.write(fh, 0, b"gio")
        await close(core, fh)
        assert store.objects == {}
        incoming = await inode_of(core, "Incoming")
        node = await core.lookup(incoming, b".goutputstream-ABC123")
        assert node.size == 3
        await core.setattr(node.inode, mtime=1_600_000_000.5)
        await core.rename(incoming, b".goutputstream-ABC123", incoming, b"doc.txt")
        assert set(store.objects) == {"Incoming/doc.txt"}
        data, info = store.objects["Incoming/doc.txt"]
        assert data == b"gio" and float(info.metadata[MTIME_META]) == 1_600_000_000.5
        assert store.requests["put"] == 1 and store.requests["copy"] == 0
    run(test)


def test_temporary_file_deleted_never_reaches_s3(run):
    async def test(core, store):
        fh = await create(core, "Incoming/.notes.txt.swp", os.O_RDWR | os.O_CREAT | os.O_EXCL)
        await core.write(fh, 4096, b"swap")
        await core.write(fh, 0, b"head")
        await close(core, fh)
        await core.unlink(await inode_of(core, "Incoming"), b".notes.txt.swp")
        assert store.objects == {} and store.requests["delete"] == 0
        assert list(core.files) == []
    run(test)


def test_non_sequential_write_to_a_new_file_switches_to_staging(run):
    async def test(core, store):
        fh = await create(core, "Incoming/z.zip")
        await core.write(fh, 0, b"header--")
        await core.write(fh, 8, b"body")
        await core.write(fh, 0, b"HEADER")  # e.g. a zip writer fixing its header
        await close(core, fh)
        assert store.objects["Incoming/z.zip"][0] == b"HEADER--body"
        fh = await create(core, "Incoming/big.bin")
        await core.write(fh, 0, os.urandom(MIN_PART + 1))  # a part has gone up
        with pytest.raises(MinervaError) as info:
            await core.write(fh, 0, b"x")
        assert info.value.errno == errno.EOPNOTSUPP
        await close(core, fh)
    run(test)


def test_large_staged_file_goes_up_in_parts(run):
    data = os.urandom(2 * MIN_PART + 3)

    async def test(core, store):
        store.add("Incoming/big.bin", data)
        fh = await core.open(await inode_of(core, "Incoming/big.bin"), os.O_WRONLY | os.O_APPEND)
        await core.write(fh, len(data), b"tail")
        await close(core, fh)
        assert store.objects["Incoming/big.bin"][0] == data + b"tail"
        assert store.requests["upload_part"] == 3 and store.requests["put"] == 0
    run(test)


def test_mtime_set_before_close_is_stored_and_listed(run):
    async def test(core, store):
        fh = await create(core, "Incoming/m.txt")
        await core.write(fh, 0, b"m")
        inode = await inode_of(core, "Incoming/m.txt")
        await core.setattr(inode, mtime=1_500_000_000.0)
        await close(core, fh)
        assert float(store.objects["Incoming/m.txt"][1].metadata[MTIME_META]) == 1_500_000_000.0
        core.listings.clear()
        core.inodes.removed("Incoming/m.txt")
        assert (await core.lookup(await inode_of(core, "Incoming"), b"m.txt")).mtime == 1_500_000_000.0
        # After the upload: shown, not persisted (that would publish the object again).
        await core.setattr(await inode_of(core, "Incoming/m.txt"), mtime=1_400_000_000.0)
        core.listings.clear()
        assert (await core.lookup(await inode_of(core, "Incoming"), b"m.txt")).mtime == 1_400_000_000.0
        assert store.requests["put"] == 1
    run(test)


def test_folder_rename_bounds_copies_in_flight_and_copies_before_deleting(run):
    async def test(core, store):
        for n in range(30):
            store.add(f"Incoming/d/f{n}", b"x")
        active, peak, deleted_before_all_copied = 0, 0, []
        copy, delete = store.copy, store.delete

        async def slow_copy(src, dst, size=None):
            nonlocal active, peak
            active += 1
            peak = max(peak, active)
            await trio.sleep(0.01)
            active -= 1
            return await copy(src, dst, size)

        async def checked_delete(path):
            if sum(k.startswith("Incoming/e/") for k in store.objects) < 30:
                deleted_before_all_copied.append(path)
            await delete(path)
        store.copy, store.delete = slow_copy, checked_delete
        incoming = await inode_of(core, "Incoming")
        await core.rename(incoming, b"d", incoming, b"e")
        assert sorted(store.objects) == sorted(f"Incoming/e/f{n}" for n in range(30))
        assert 1 < peak <= 8 and deleted_before_all_copied == []
    run(test)


def test_rename_onto_an_existing_name_replaces_it(run):
    async def test(core, store):
        store.add("Incoming/a", b"new", {MTIME_META: "1000"})
        store.add("Incoming/b", b"old")
        incoming = await inode_of(core, "Incoming")
        await core.rename(incoming, b"a", incoming, b"b")
        assert set(store.objects) == {"Incoming/b"}
        assert store.objects["Incoming/b"][0] == b"new"
        assert store.objects["Incoming/b"][1].metadata[MTIME_META] == "1000"
    run(test)


def test_failed_staged_upload_fails_close_with_eio_and_leaves_the_object(run):
    async def test(core, store):
        store.add("Incoming/keep.txt", b"original")
        store.fail_kinds.add("put")
        fh = await core.open(await inode_of(core, "Incoming/keep.txt"), os.O_WRONLY | os.O_APPEND)
        await core.write(fh, 8, b"+more")
        with pytest.raises(MinervaError) as info:
            await core.flush(fh)
        assert info.value.errno == errno.EIO
        await core.release(fh)
        assert store.objects["Incoming/keep.txt"][0] == b"original"
        assert list(core.files) == []
    run(test)


@pytest.mark.parametrize("staged", [False, True])
def test_parts_go_up_in_parallel_with_a_bound(run, staged):
    data = os.urandom((MAX_INFLIGHT + 2) * MIN_PART)

    async def test(core, store):
        active, peak, gate = 0, 0, trio.Event()
        upload_part = store.upload_part

        async def held_part(*args):
            nonlocal active, peak
            active += 1
            peak = max(peak, active)
            await gate.wait()
            active -= 1
            return await upload_part(*args)
        store.upload_part = held_part
        name = "Incoming/.big.bin.AbC123" if staged else "Incoming/big.bin"
        written = 0

        async def writer():
            nonlocal written
            fh = await create(core, name)
            for offset in range(0, len(data), MIB):
                written += await core.write(fh, offset, data[offset:offset + MIB])
            await close(core, fh)
            if staged:
                incoming = await inode_of(core, "Incoming")
                await core.rename(incoming, b".big.bin.AbC123", incoming, b"big.bin")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            with trio.fail_after(30):  # staged parts are read from disk in worker threads
                while active < MAX_INFLIGHT:
                    await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked()
            # Parts overlap, and a fast writer waits instead of filling memory.
            assert active == peak == MAX_INFLIGHT
            if not staged:
                assert written < len(data)
            gate.set()
        assert store.objects["Incoming/big.bin"][0] == data
        assert peak == MAX_INFLIGHT
    run(test)


async def all_spares(area: StagingArea) -> None:
    """Poll (with a deadline) until the spares are all made: they are made in a thread."""
    with trio.fail_after(10):
        while len(area._spares) < staging.SPARES:
            await trio.sleep(0.001)


def test_spare_staging_files_are_made_ahead_private_and_closed_at_the_end():
    """keep_spares makes SPARES empty unnamed 0600 files ahead; a create takes one and another
    is made; when the task ends every spare is closed."""
    area = StagingArea.private_temporary()
    taken = []

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(area.keep_spares)
            await all_spares(area)
            spares = list(area._spares)
            taken.append(area.new_file())
            assert taken[0] in spares
            await all_spares(area)  # made again
            spares = list(area._spares)
            nursery.cancel_scope.cancel()
        for fd in spares:
            with pytest.raises(OSError):
                os.fstat(fd)  # closed
    trio.run(main)
    st = os.fstat(taken[0])
    assert st.st_size == 0 and st.st_nlink == 0 and st.st_mode & 0o777 == 0o600
    assert os.listdir(f"/proc/self/fd/{area.folder_fd}") == []
    os.close(taken[0])
