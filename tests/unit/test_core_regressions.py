"""Regressions found by the model test (test_core_model.py): each the shortest sequence
Hypothesis found, written out as plain Core calls. /work/notes/model_findings.md (and the
docstrings) say what each shows and what is promised. The `test_wb_` ones (at the end) were
found by the write-back model (test_core_model_writeback.py) and run Core as the daemon does
with --write-back (wb_support.Daemon), on a MockClock that moves only when told.

The kernel's part is played by hand: a close() of a descriptor is Core.flush(fh); RELEASE
(Core.release) comes after the last descriptor of that fh is closed; `still_open` answers
from the descriptor counts the test keeps.
"""

import contextlib
import errno
import math
import os

import pytest
import trio
import trio.testing
from model_support import PART, ModelStore, make_core, quiet_logs, set_small_parts, ttl_passes
from wb_support import SPOOL_CAP, Daemon, drain_spool, example_folder, inline_threads, remove_folder

from minerva_mount import writeback
from minerva_mount.core import Core
from minerva_mount.errors import MinervaError
from minerva_mount.localfiles import State
from minerva_mount.namespace import ROOT_INODE

W = os.O_WRONLY | os.O_CREAT | os.O_TRUNC  # create, write-only: a stream
RW = os.O_RDWR | os.O_CREAT


@pytest.fixture(autouse=True)
def setup(monkeypatch):
    set_small_parts(monkeypatch)  # files of a few bytes go up in parts of PART bytes
    with quiet_logs():
        yield


class Kernel:
    """Core over a ModelStore, with the calls a program makes through the kernel."""

    def __init__(self, core: Core, store: ModelStore):
        self.core, self.store = core, store
        self.descs: dict[int, int] = {}  # fh -> descriptors open on it

    async def inode(self, path: str) -> int:
        inode = ROOT_INODE
        for part in path.split("/") if path else []:
            inode = (await self.core.lookup(inode, part.encode())).inode
        return inode

    async def create(self, path: str, flags: int = W) -> int:
        parent, _, name = path.rpartition("/")
        fh, _ = await self.core.create(await self.inode(parent), name.encode(), flags)
        self.descs[fh] = 1
        return fh

    async def open(self, path: str, flags: int) -> int:
        fh = await self.core.open(await self.inode(path), flags)
        self.descs[fh] = 1
        return fh

    def dup(self, fh: int) -> None:
        self.descs[fh] += 1

    async def close(self, fh: int, release: bool = True) -> None:
        """close(2): FLUSH, and RELEASE after the last descriptor (unless held back)."""
        self.descs[fh] -= 1
        await self.core.flush(fh)
        if release and self.descs[fh] == 0:
            await self.core.release(fh)

    async def release(self, fh: int) -> None:
        await self.core.release(fh)

    async def unlink(self, path: str) -> None:
        parent, _, name = path.rpartition("/")
        await self.core.unlink(await self.inode(parent), name.encode())

    async def rename(self, src: str, dst: str) -> None:
        sp, _, sn = src.rpartition("/")
        dp, _, dn = dst.rpartition("/")
        await self.core.rename(await self.inode(sp), sn.encode(), await self.inode(dp), dn.encode())

    async def truncate(self, path: str, size: int) -> None:
        await self.core.setattr(await self.inode(path), size=size)

    async def mkdir(self, path: str) -> None:
        parent, _, name = path.rpartition("/")
        await self.core.mkdir(await self.inode(parent), name.encode())

    async def rmdir(self, path: str) -> None:
        parent, _, name = path.rpartition("/")
        await self.core.rmdir(await self.inode(parent), name.encode())

    async def listing(self, path: str) -> dict[str, int]:
        fh = await self.core.opendir(await self.inode(path))
        try:
            return {name: node.size for name, node in self.core.readdir(fh, 0)}
        finally:
            self.core.releasedir(fh)

    async def read_file(self, path: str) -> bytes:
        fh = await self.core.open(await self.inode(path), os.O_RDONLY)
        try:
            return bytes(await self.core.read(fh, 0, 1 << 20))
        finally:
            await self.core.release(fh)

    def stored(self, key: str) -> bytes | None:
        return self.store.content(key)


def run(test, tmp_path):
    disks = []

    async def main():
        store = ModelStore()
        kernel = None
        async with trio.open_nursery() as nursery:
            core, disk = make_core(store, nursery, str(tmp_path / "staging"),
                                   still_open=lambda fh: kernel.descs.get(fh, 0) > 0)
            disks.append(disk)
            kernel = Kernel(core, store)
            kernel.disk = disk
            await test(kernel)
            nursery.cancel_scope.cancel()
    try:
        trio.run(main)
    finally:
        for disk in disks:
            if disk is not None:
                disk.close()


async def fails_with(code: int, coro) -> None:
    with pytest.raises(MinervaError) as info:
        await coro
    assert info.value.errno == code, info.value


async def while_publishing(k: Kernel, fh: int, other) -> None:
    """close(fh) with its PUT (or CompleteMultipartUpload) held at a gate while `other()` runs:
    a second process's call that arrives while the first one's close is publishing."""
    gate = trio.Event()
    for kind in ("put", "complete_multipart"):
        k.store.gates[kind] = gate
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(k.close, fh)
            while not k.store.arrived:
                await trio.sleep(0)
            async with trio.open_nursery() as inner:
                inner.start_soon(other)
                for _ in range(20):
                    await trio.sleep(0)
                gate.set()
    finally:
        k.store.gates.clear()


# ----- findings ------------------------------------------------------------------------------


def test_rename_while_close_publishes_waits_instead_of_ebusy(tmp_path):
    """M1: a rename that arrives while the file's close is publishing it fails with EBUSY.
    Promised: the rename is ordered after (or before) the close; the file ends up under the
    new name only."""
    async def test(k):
        fh = await k.create("Incoming/a")
        await k.core.write(fh, 0, b"x")
        await k.core.setattr(await k.inode("Incoming/a"), size=1 + PART)  # (out of order: staged)
        await while_publishing(k, fh, lambda: k.rename("Incoming/a", "Incoming/b"))
        assert k.stored("Incoming/a") is None
        assert k.stored("Incoming/b") == b"x" + bytes(PART)
    run(test, tmp_path)


def test_unlink_while_close_publishes_waits_instead_of_ebusy(tmp_path):
    """M1 (streamed file): unlink while the close's PUT is in flight: EBUSY 'being written'."""
    async def test(k):
        fh = await k.create("Incoming/a")
        await k.core.write(fh, 0, b"x")
        await while_publishing(k, fh, lambda: k.unlink("Incoming/a"))
        assert k.stored("Incoming/a") is None
        assert "a" not in await k.listing("Incoming")
    run(test, tmp_path)


def test_unlink_while_close_publishes_does_not_come_back(tmp_path):
    """M2: unlink of a staged file while its close is publishing returns 0, then the PUT
    lands: the deleted name is back in S3 and in the listing."""
    async def test(k):
        fh = await k.create("Incoming/a", RW)
        await k.core.write(fh, 0, b"x")
        await while_publishing(k, fh, lambda: k.unlink("Incoming/a"))
        assert k.stored("Incoming/a") is None
        assert "a" not in await k.listing("Incoming")
    run(test, tmp_path)


def test_write_to_unlinked_open_file_keeps_working(tmp_path):
    """M3: a file open read-write is unlinked; a write to a block not fetched yet fails with
    ENOENT (the lazy fill GETs the object just deleted). Promised (localfiles.py: DETACHED):
    its handles keep working on its content; nothing is sent."""
    async def test(k):
        k.store.add("Incoming/a", b"0123456789abcdefGHIJ")  # two blocks of PART bytes
        fh = await k.open("Incoming/a", os.O_RDWR)
        await k.core.write(fh, 0, b"X")  # fills block 0 only
        await k.unlink("Incoming/a")
        await k.core.write(fh, PART + 1, b"Y")  # block 1: never fetched
        assert bytes(await k.core.read(fh, 0, 64)) == b"X123456789abcdefGYIJ"
        await k.close(fh)
        assert k.stored("Incoming/a") is None
    run(test, tmp_path)


def test_failed_folder_rename_shows_the_copies_it_made(tmp_path):
    """M4: a folder rename fails after copying (here the new folder's marker PUT fails):
    S3 holds the copies under the new name (documented: both names, never neither), but the
    mount does not list the new folder until its listing TTL passes."""
    async def test(k):
        await k.mkdir("Incoming/d")
        k.store.add("Incoming/d/a", b"A")
        await k.listing("Incoming/d")
        k.store.failing.add("put")
        await fails_with(errno.EIO, k.rename("Incoming/d", "Incoming/e"))
        k.store.heal()
        assert k.stored("Incoming/e/a") == b"A"  # the copy was made
        assert "e" in await k.listing("Incoming")
    run(test, tmp_path)


def test_folder_rename_onto_a_folder_holding_a_new_file_is_enotempty(tmp_path):
    """M5: `mv d e` where e holds only a file being written (not in S3 yet) succeeds; e's
    file is then published into the moved folder. Promised: ENOTEMPTY, as for any folder with
    a file in it (the file is listed)."""
    async def test(k):
        await k.mkdir("Incoming/d")
        await k.mkdir("Incoming/e")
        fh = await k.create("Incoming/e/a")
        await fails_with(errno.ENOTEMPTY, k.rename("Incoming/d", "Incoming/e"))
        await k.close(fh)
        assert k.stored("Incoming/d/") == b"" and k.stored("Incoming/e/a") == b""
    run(test, tmp_path)


def test_rmdir_of_a_folder_holding_a_staged_file_is_enotempty(tmp_path):
    """M6 (notes case 11): rmdir of a folder whose only file is open read-write (staged, not
    in S3 yet) succeeds. Promised: ENOTEMPTY (the file is listed in it)."""
    async def test(k):
        await k.mkdir("Incoming/d")
        fh = await k.create("Incoming/d/a", RW | os.O_TRUNC)  # open(f, "w+"): sent at close
        await fails_with(errno.ENOTEMPTY, k.rmdir("Incoming/d"))
        await k.close(fh)
        assert k.stored("Incoming/d/") == b"" and k.stored("Incoming/d/a") == b""
    run(test, tmp_path)


def test_open_for_writing_after_touch_before_release(tmp_path):
    """M7: `touch a; echo x > a` when the kernel's RELEASE of touch's descriptor has not
    arrived yet: the second open (O_WRONLY|O_TRUNC) fails with EBUSY ("already open for
    writing"). Promised: a closed file can be opened again; EBUSY in that window is
    documented for readers only."""
    async def test(k):
        fh = await k.create("Incoming/a")
        await k.close(fh, release=False)
        fh2 = await k.open("Incoming/a", os.O_WRONLY | os.O_TRUNC)
        await k.core.write(fh2, 0, b"x")
        await k.close(fh2)
        await k.release(fh)
        assert k.stored("Incoming/a") == b"x"
    run(test, tmp_path)


def test_truncate_by_path_reports_a_failed_upload(tmp_path):
    """M8: truncate(path) of a closed file whose upload then fails (here the GET that fills
    the staging copy) returns 0; S3 keeps the old object. Promised: truncate returns once
    the new object is in S3, or fails with EIO (nothing fails silently)."""
    async def test(k):
        k.store.add("Incoming/a", b"\0\0")
        k.store.failing.add("get")
        try:
            await k.truncate("Incoming/a", 1)
        except MinervaError as exc:
            assert exc.errno == errno.EIO
            assert k.stored("Incoming/a") == b"\0\0"
        else:
            assert k.stored("Incoming/a") == b"\0", "truncate returned 0; S3 holds the old object"
    run(test, tmp_path)


def test_rename_to_a_temporary_name_sends_nothing(tmp_path):
    """M9 (notes case 9): `mv a a.part` of an uploaded file copies it in S3 to `a.part`.
    Promised: temporary names never reach S3; the name `a` is gone from S3 at once."""
    async def test(k):
        k.store.add("Incoming/a", b"")
        await k.rename("Incoming/a", "Incoming/a.part")
        assert k.stored("Incoming/a") is None
        assert k.stored("Incoming/a.part") is None
        assert await k.listing("Incoming") == {"a.part": 0}
    run(test, tmp_path)


def test_unlink_after_touch_before_release(tmp_path):
    """M10 (notes case 5): `touch a; rm a` with touch's RELEASE not arrived yet: EBUSY.
    Promised: rm succeeds and nothing is published at the release."""
    async def test(k):
        fh = await k.create("Incoming/a")
        await k.close(fh, release=False)
        await k.unlink("Incoming/a")
        await k.release(fh)
        assert k.stored("Incoming/a") is None
        assert "a" not in await k.listing("Incoming")
    run(test, tmp_path)


def test_unchanged_temporary_file_does_not_hide_s3(tmp_path):
    """M11: an object with a temporary name (`a.part`, put by someone else) opened for
    writing and closed unchanged stays held here for good: once it is deleted in S3 (or
    replaced), the mount still lists its local copy. Promised: a file with nothing to send
    is not held; the listing follows S3 (after the TTL)."""
    async def test(k):
        k.store.add("Incoming/a.part", b"")
        fh = await k.open("Incoming/a.part", os.O_WRONLY | os.O_TRUNC)
        await k.close(fh)
        del k.store.objects["Incoming/a.part"]
        ttl_passes(k.core)  # the listing TTL passes
        assert await k.listing("Incoming") == {}
    run(test, tmp_path)


def test_truncate_after_touch_before_release_is_published(tmp_path):
    """M12 (notes case 17): `touch a; truncate -s 1 a` with touch's RELEASE not arrived yet:
    truncate returns 0 but nothing is in S3 until the release (whose failure nobody would
    see). Promised: truncate of a closed file returns once the object is in S3."""
    async def test(k):
        fh = await k.create("Incoming/a")
        await k.close(fh, release=False)
        await k.truncate("Incoming/a", 1)
        assert k.stored("Incoming/a") == b"\0"
        await k.release(fh)
        assert k.stored("Incoming/a") == b"\0"
    run(test, tmp_path)


def test_folder_rename_after_touch_before_release(tmp_path):
    """M13 (notes case 19): `mkdir d; touch d/a; mv d e` with touch's RELEASE not arrived
    yet: EBUSY ("holds files being written"). Promised: the folder moves; `a` is published
    as e/a (at the release at the latest), never as d/a."""
    async def test(k):
        await k.mkdir("Incoming/d")
        fh = await k.create("Incoming/d/a")
        await k.close(fh, release=False)
        await k.rename("Incoming/d", "Incoming/e")
        await k.release(fh)
        assert k.stored("Incoming/e/a") == b""
        assert k.stored("Incoming/d/a") is None and k.stored("Incoming/d/") is None
    run(test, tmp_path)


def test_last_writers_close_publishes_though_an_earlier_release_is_late(tmp_path):
    """M14: two writers in turn; the first closed but its RELEASE not arrived yet when the
    second (the last open writer) closes: that close returns 0 without publishing (Core
    still counts the first as a writer), and the object goes up at the later release, where
    a failure reaches nobody. Promised: the last writer's close returns once the object is
    in S3, or fails with EIO."""
    async def test(k):
        fh = await k.create("Incoming/b", RW)
        await k.close(fh, release=False)
        fh2 = await k.open("Incoming/b", os.O_WRONLY | os.O_TRUNC)
        await k.core.write(fh2, 0, b"x")
        await k.close(fh2)
        assert k.stored("Incoming/b") == b"x"
        await k.release(fh)
    run(test, tmp_path)


def test_kept_back_file_renamed_before_release_is_sent_by_the_rename(tmp_path):
    """M15: `a.part` written and closed (kept back), its RELEASE not arrived yet, renamed to
    `d`: the rename returns 0 without sending; the object goes up at the release (a failure
    there reaches nobody). Promised: renaming a closed kept-back file to a final name
    returns once it is in S3 under that name, or fails (EIO) and keeps it."""
    async def test(k):
        fh = await k.create("Incoming/a.part")
        await k.core.write(fh, 0, b"x")
        await k.close(fh, release=False)
        await k.rename("Incoming/a.part", "Incoming/d")
        assert k.stored("Incoming/d") == b"x"
        await k.release(fh)
        assert k.stored("Incoming/d") == b"x" and k.stored("Incoming/a.part") is None
    run(test, tmp_path)


def test_a_failed_write_changes_nothing(tmp_path):
    """M16: a streamed write that fills the first part fails with EIO when starting the
    multipart upload fails (CreateMultipartUpload refused once), yet its bytes stay
    buffered: stat shows the larger size and the next close publishes them. Promised: a
    refused call changes nothing (or the upload is failed for good and close fails)."""
    async def test(k):
        fh = await k.create("Incoming/a")
        k.store.fail_once.add("create_multipart")
        await fails_with(errno.EIO, k.core.write(fh, 0, b"x" * PART))
        assert (await k.core.getattr(await k.inode("Incoming/a"))).size == 0
        try:
            await k.close(fh)
        except MinervaError:
            assert k.stored("Incoming/a") is None
        else:
            assert k.stored("Incoming/a") == b"", "the bytes of the failed write were published"
    run(test, tmp_path)


def test_stream_renamed_to_a_temporary_name_is_kept_back(tmp_path):
    """M9b: a new file being streamed (nothing sent yet) renamed to `a.part`, then closed:
    published as `a.part`. Promised: kept back under a temporary name; sent only when
    renamed to a final name."""
    async def test(k):
        fh = await k.create("Incoming/a")
        await k.core.write(fh, 0, b"x")
        await k.rename("Incoming/a", "Incoming/a.part")
        await k.close(fh)
        assert k.stored("Incoming/a.part") is None and k.stored("Incoming/a") is None
        await k.rename("Incoming/a.part", "Incoming/b")
        assert k.stored("Incoming/b") == b"x"
    run(test, tmp_path)


def test_folder_renamed_onto_an_empty_folder_shows_its_files(tmp_path):
    """M17: `mv e d` onto an existing empty folder `d` whose listing is cached: S3 is right
    (d/a), but `ls d` shows nothing until the listing TTL passes (the cached listings of the
    source are forgotten, not those of the destination)."""
    async def test(k):
        await k.mkdir("Incoming/d")
        await k.mkdir("Incoming/e")
        k.store.add("Incoming/e/a", b"")
        ttl_passes(k.core)  # (the put was made outside: the listing TTL passes)
        assert await k.listing("Incoming/d") == {}
        await k.rename("Incoming/e", "Incoming/d")
        assert k.stored("Incoming/d/a") == b""
        assert await k.listing("Incoming/d") == {"a": 0}
        assert await k.listing("Incoming") == {"d": 0}
    run(test, tmp_path)


def test_listing_after_a_failed_close_shows_what_s3_holds(tmp_path):
    """M18: `a` (0 bytes) rewritten to 16 bytes; the close fails (CreateMultipartUpload
    refused) and the file is released: `ls -l` still shows 16 bytes, S3 holds 0. opendir
    reuses its last snapshot (same listing, no version bump) whose nodes the overlay had set
    to the local size."""
    async def test(k):
        k.store.add("Incoming/a", b"")
        assert await k.listing("Incoming") == {"a": 0}
        k.store.failing.add("create_multipart")
        fh = await k.open("Incoming/a", os.O_WRONLY | os.O_TRUNC)
        await k.core.write(fh, PART - 1, b"\0")
        assert await k.listing("Incoming") == {"a": PART}
        await fails_with(errno.EIO, k.close(fh, release=False))
        await k.release(fh)
        assert await k.listing("Incoming") == {"a": 0}
    run(test, tmp_path)


def test_a_failed_unlink_changes_nothing(tmp_path):
    """M19: unlink of a file held locally (open read-write, not in S3 yet) when DeleteObject
    fails: EIO, but the local file was dropped first: it vanishes from the listing and its
    close publishes nothing. Promised: a refused unlink changes nothing."""
    async def test(k):
        k.store.add("Incoming/a", b"old")  # in S3: the unlink must send a DeleteObject
        fh = await k.open("Incoming/a", os.O_RDWR)
        await k.core.write(fh, 0, b"x")
        k.store.failing.add("delete")
        await fails_with(errno.EIO, k.unlink("Incoming/a"))
        k.store.heal()
        assert await k.listing("Incoming") == {"a": 3}
        await k.close(fh)
        assert k.stored("Incoming/a") == b"xld"
    run(test, tmp_path)


def test_rename_of_a_file_being_overwritten_moves_it(tmp_path):
    """M20: `a` exists in S3; a program opens it O_WRONLY|O_TRUNC (a new stream) and, still
    writing, `mv a b` happens: the stream takes the name `b` locally but the old object `a`
    stays in S3 (and in the listing) for good. Promised: after the rename, `a` is gone."""
    async def test(k):
        k.store.add("Incoming/a", b"old")
        fh = await k.open("Incoming/a", os.O_WRONLY | os.O_TRUNC)
        await k.core.write(fh, 0, b"new")
        await k.rename("Incoming/a", "Incoming/b")
        assert k.stored("Incoming/a") is None
        await k.close(fh)
        assert k.stored("Incoming/a") is None and k.stored("Incoming/b") == b"new"
        assert await k.listing("Incoming") == {"b": 3}
    run(test, tmp_path)


def test_open_file_renamed_to_a_temporary_name_sends_nothing(tmp_path):
    """M9c: `b` (in S3) open read-write and changed, renamed to `a.part`: the rename copies
    the old object to `a.part` in S3 (then deletes `b`); unlinking `a.part` later leaves that
    copy in S3 for good. Promised: nothing under a temporary name reaches S3."""
    async def test(k):
        k.store.add("Incoming/b", b"\0")
        fh = await k.open("Incoming/b", os.O_RDWR)
        await k.core.setattr(await k.inode("Incoming/b"), size=0)
        await k.rename("Incoming/b", "Incoming/a.part")
        assert k.stored("Incoming/a.part") is None and k.stored("Incoming/b") is None
        await k.close(fh)
        await k.unlink("Incoming/a.part")
        assert k.store.objects == {}
    run(test, tmp_path)


def test_unlink_of_a_truncated_temporary_file_deletes_the_object(tmp_path):
    """M21: `a.part` exists in S3 (put by someone else); a program opens it O_WRONLY|O_TRUNC
    (staged without a base: temporary names do not stream) and `rm a.part`: unlink takes it
    for a file that never reached S3 and sends no DeleteObject; the object stays and is
    listed again. Promised: a deleted name never comes back."""
    async def test(k):
        k.store.add("Incoming/a.part", b"old")
        fh = await k.open("Incoming/a.part", os.O_WRONLY | os.O_TRUNC)
        await k.unlink("Incoming/a.part")
        assert k.stored("Incoming/a.part") is None
        await k.close(fh)
        assert k.stored("Incoming/a.part") is None
        assert await k.listing("Incoming") == {}
    run(test, tmp_path)


def test_rename_onto_a_file_being_written_replaces_it(tmp_path):
    """M22: `mv b a` while `a` is a new file being written (streamed, open): the rename
    copies b over a and returns 0, but a's pending stream keeps the name: the listing shows
    the stream (size 0), and its close publishes over the renamed file. Promised (README:
    a file replaced by a rename is detached, never sent): `a` is b's content and the
    replaced file's close sends nothing."""
    async def test(k):
        fh = await k.create("Incoming/a")
        k.store.add("Incoming/b", b"B")
        ttl_passes(k.core)
        await k.rename("Incoming/b", "Incoming/a")
        assert await k.listing("Incoming") == {"a": 1}
        await k.close(fh)
        assert k.stored("Incoming/a") == b"B" and k.stored("Incoming/b") is None
    run(test, tmp_path)


def test_a_truncate_refused_for_a_full_disk_leaves_nothing_held(tmp_path):
    """M23: truncate(path) of a closed object while the staging disk is full: ENOSPC (fine),
    but the staging copy made for it stays held: the mount goes on showing it over S3 (an
    object put by others afterwards is hidden) and the stop names the file as unfinished.
    Promised: a refused call changes nothing."""
    async def test(k):
        if k.disk is None:
            pytest.skip("Core takes no StagingArea here")
        k.store.add("Incoming/a", b"")
        k.disk.mode = "enospc"
        await fails_with(errno.ENOSPC, k.truncate("Incoming/a", 1))
        k.disk.mode = None
        k.store.add("Incoming/a", b"\0")
        ttl_passes(k.core)
        assert await k.listing("Incoming") == {"a": 1}
        assert await k.core.drain(0.1) == []
    run(test, tmp_path)


def test_kept_back_file_renamed_with_a_read_only_descriptor_open_is_sent(tmp_path):
    """M24: a file created O_RDONLY|O_CREAT under a temporary name (kept back), renamed to a
    final name while that read-only descriptor is open: nothing is sent, not at the rename
    and not at the close either; the file stays held (drain names it) and is lost at stop.
    Promised: "sent if renamed", and a descriptor open for reading never holds a publish
    back."""
    async def test(k):
        fh = await k.create("Incoming/.a.swp", os.O_RDONLY | os.O_CREAT)
        await k.rename("Incoming/.a.swp", "Incoming/a")
        assert k.stored("Incoming/a") == b""
        await k.close(fh)
        assert k.stored("Incoming/a") == b""
    run(test, tmp_path)


def test_a_truncate_that_fails_changes_nothing(tmp_path):
    """M23b: truncate(path) of a closed 2-byte object when the GET that fills the staging
    copy fails: EIO (fine), but the truncated copy stays held: `ls -l` shows 1 byte while S3
    holds 2. Promised: a refused call changes nothing."""
    async def test(k):
        k.store.add("Incoming/a", b"\0\0")
        k.store.failing.add("get")
        await fails_with(errno.EIO, k.truncate("Incoming/a", 1))
        k.store.heal()
        assert await k.listing("Incoming") == {"a": 2}
        assert await k.read_file("Incoming/a") == b"\0\0"
    run(test, tmp_path)


def test_truncating_open_of_a_side_effect_file_wants_it(tmp_path):
    """M25 (a choice of the model; the documents leave it open): `exec 3<>a` creates `a` as a
    side effect (kept back if never written); then `: > a` (O_WRONLY|O_TRUNC) and both close
    without a write: `a` stays kept back. The model takes the truncating open as "a program
    that creates a file to write it (`>`) means one": the last close publishes it."""
    async def test(k):
        fh = await k.create("Incoming/a", RW)
        fh2 = await k.open("Incoming/a", os.O_WRONLY | os.O_TRUNC)
        await k.close(fh2)
        await k.close(fh)
        assert k.stored("Incoming/a") == b""
    run(test, tmp_path)


def test_truncate_with_only_a_read_only_descriptor_open_is_sent(tmp_path):
    """M24b: `a` created O_RDONLY|O_CREAT, descriptor kept open, `truncate -s 1 a`: nothing is
    sent until that read-only descriptor is closed (and then an error would go to a close
    that never wrote). Promised: truncate by path with no writer open is in S3 when it
    returns; a descriptor open for reading never holds a publish back."""
    async def test(k):
        fh = await k.create("Incoming/a", os.O_RDONLY | os.O_CREAT)
        await k.truncate("Incoming/a", 1)
        assert k.stored("Incoming/a") == b"\0"
        await k.close(fh)
    run(test, tmp_path)


def test_a_failed_rename_to_a_temporary_name_leaves_nothing_held(tmp_path):
    """M26: `mv a a.part` of an object (leaves S3, kept back) when DeleteObject fails: EIO
    (fine: `a` is still in S3), but a local copy of `a` stays held: drain (the stop) names
    `a` as unfinished, and a later change of `a` by others is hidden. Promised: a refused
    call changes nothing."""
    async def test(k):
        k.store.add("Incoming/a", b"A")
        k.store.failing.add("delete")
        await fails_with(errno.EIO, k.rename("Incoming/a", "Incoming/a.part"))
        k.store.heal()
        assert k.stored("Incoming/a") == b"A" and k.stored("Incoming/a.part") is None
        assert await k.core.drain(0.1) == []
        k.store.add("Incoming/a", b"BB")
        ttl_passes(k.core)
        assert await k.listing("Incoming") == {"a": 2}
    run(test, tmp_path)


def test_read_only_creator_does_not_hold_back_the_writers_close(tmp_path):
    """M24c: `a` created O_RDONLY|O_CREAT and kept open; `echo x > a` (open O_WRONLY|O_TRUNC,
    write, close): that close returns 0 without publishing; `a` goes up only when the
    read-only descriptor is closed. Promised: a descriptor open for reading never holds a
    publish back; the writer's close returns once `a` is in S3."""
    async def test(k):
        fh = await k.create("Incoming/a", os.O_RDONLY | os.O_CREAT)
        fh2 = await k.open("Incoming/a", os.O_WRONLY | os.O_TRUNC)
        await k.core.write(fh2, 0, b"x")
        await k.close(fh2)
        assert k.stored("Incoming/a") == b"x"
        await k.close(fh)
    run(test, tmp_path)


def test_open_file_renamed_to_a_temporary_name_is_kept(tmp_path):
    """M27: `a` (in S3) open read-write, unchanged, `mv a a.part`, close: `a` left S3 (right:
    temporary names are kept back) but at the release the copy is dropped as "unchanged":
    `a.part` vanishes from the mount, and the file is gone everywhere. Promised: renamed to
    a temporary name, it is kept back (shown, sent when renamed to a final name)."""
    async def test(k):
        k.store.add("Incoming/a", b"A")
        fh = await k.open("Incoming/a", os.O_RDWR)
        await k.rename("Incoming/a", "Incoming/a.part")
        await k.close(fh)
        assert await k.listing("Incoming") == {"a.part": 1}
        await k.rename("Incoming/a.part", "Incoming/b")
        assert k.stored("Incoming/b") == b"A" and set(k.store.objects) == {"Incoming/b"}
    run(test, tmp_path)


def test_a_failed_truncate_with_a_late_release_changes_nothing(tmp_path):
    """M28: `a` written and closed, its RELEASE not arrived yet; `truncate -s 1 a` when the
    PUT fails: EIO (fine), but the truncated staging copy stays (the unreleased handle keeps
    it): `ls -l` shows 1 byte, S3 holds 0, and a later close would send the refused change.
    Promised: a refused call changes nothing."""
    async def test(k):
        fh = await k.create("Incoming/a", os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        await k.close(fh, release=False)
        assert k.stored("Incoming/a") == b""
        k.store.failing.add("put")
        await fails_with(errno.EIO, k.truncate("Incoming/a", 1))
        k.store.heal()
        assert await k.listing("Incoming") == {"a": 0}
        await k.release(fh)
        assert await k.listing("Incoming") == {"a": 0}
        assert k.stored("Incoming/a") == b""
    run(test, tmp_path)


def test_read_of_a_deleted_object_is_eio(tmp_path):
    """M29: `a` opened read-only, `rm a`, then a read through the open handle: ENOENT (the
    GET finds no object). read(2) has no ENOENT; programs treat it as a bug. Promised: the
    bytes, or EIO (as for an object replaced under a reader)."""
    async def test(k):
        k.store.add("Incoming/a", b"\0")
        fh = await k.open("Incoming/a", os.O_RDONLY)
        await k.unlink("Incoming/a")
        try:
            assert bytes(await k.core.read(fh, 0, 1)) == b"\0"
        except MinervaError as exc:
            assert exc.errno == errno.EIO, exc
        await k.close(fh)
    run(test, tmp_path)


def test_failed_folder_rename_onto_a_folder_shows_the_copies_it_made(tmp_path):
    """M30: `mv e d` onto an existing empty folder `d` (its listing cached) fails after
    copying (DeleteObject refused): S3 holds d/a (documented: both names), but `ls d` stays
    empty until the listing TTL. M4's fix forgets the listings of the parent folders, not
    the cached listing of the destination folder itself."""
    async def test(k):
        await k.mkdir("Incoming/d")
        await k.mkdir("Incoming/e")
        k.store.add("Incoming/e/a", b"")
        ttl_passes(k.core)
        assert await k.listing("Incoming/d") == {}
        k.store.failing.add("delete")
        await fails_with(errno.EIO, k.rename("Incoming/e", "Incoming/d"))
        k.store.heal()
        assert k.stored("Incoming/d/a") == b""
        assert await k.listing("Incoming/d") == {"a": 0}
    run(test, tmp_path)


def test_a_failed_truncate_of_a_published_file_with_a_late_release_changes_nothing(tmp_path):
    """M31 (the long run): `a` written out of order (staged), closed and published, its RELEASE
    late; `truncate -s 0 a` while PUTs fail: EIO, and the listing showed 0 bytes while S3
    held 2. A truncate of a file S3 holds as it is starts from S3, so a refusal is undone."""
    async def test(k):
        fh = await k.create("Incoming/a")
        await k.core.write(fh, 1, b"\0")  # out of order: moved to a staging copy
        await k.close(fh, release=False)
        assert k.stored("Incoming/a") == b"\0\0"
        k.store.failing.add("put")
        await fails_with(errno.EIO, k.truncate("Incoming/a", 0))
        k.store.heal()
        assert await k.listing("Incoming") == {"a": 2}
        await k.release(fh)
        assert k.stored("Incoming/a") == b"\0\0"
        assert await k.listing("Incoming") == {"a": 2}
    run(test, tmp_path)


def test_reader_of_a_held_file_sees_a_truncate_by_path(tmp_path):
    """M32 (the write-through model, a 2,000-example run on 570b8a1; fails as far back as
    6284442): `.a.swp` created O_RDONLY|O_CREAT and kept open, `mv .a.swp a` (sent: a final
    name), `truncate -s 1 a`: the descriptor reads b"" (0 bytes), not b"\0". The file was
    held when it was opened, so its handle reads the held copy, live (README); M31's rule (a
    truncate of a file S3 holds as it is starts from S3: core._truncate detaches the held
    file) leaves that handle on a detached copy."""
    async def test(k):
        fh = await k.create("Incoming/.a.swp", os.O_RDONLY | os.O_CREAT)
        await k.rename("Incoming/.a.swp", "Incoming/a")
        await k.truncate("Incoming/a", 1)
        assert bytes(await k.core.read(fh, 0, 1)) == b"\0"
    run(test, tmp_path)


def test_a_failed_rename_onto_a_file_being_written_leaves_it(tmp_path):
    """M33 (the write-through model, as M32): `a` being written (a stream, open), PUTs
    failing, `mv .a.swp a` (.a.swp kept back, sent by the rename): EIO (right), but `a` is
    gone from the mount and its writer's content is never sent: LocalFiles.renamed detaches
    the file held at `a` before the publish, and the rename's undo (renamed back, kept back)
    cannot bring it back. Promised: a refused rename changes nothing."""
    async def test(k):
        fh = await k.create("Incoming/a")
        await k.core.write(fh, 0, b"x")
        k.store.failing.add("put")
        await k.create("Incoming/.a.swp", os.O_RDONLY | os.O_CREAT)
        await fails_with(errno.EIO, k.rename("Incoming/.a.swp", "Incoming/a"))
        k.store.heal()
        assert set(await k.listing("Incoming")) == {".a.swp", "a"}
        await k.close(fh)
        assert k.stored("Incoming/a") == b"x"
    run(test, tmp_path)


# ----- write-back findings (test_core_model_writeback.py) ----------------------------------


def run_wb(test, cap: int = SPOOL_CAP, autojump: bool = False):
    """`test(k)` against Core with write-back (as the daemon runs it), on a MockClock that
    moves when told (or, with `autojump`, whenever every task waits), a spool of `cap` bytes."""
    folder = example_folder()

    async def main():
        store = ModelStore()
        kernel = None
        async with trio.open_nursery() as nursery:
            daemon = Daemon(store, folder, still_open=lambda fh: kernel.descs.get(fh, 0) > 0, cap=cap)
            kernel = Kernel(await daemon.start(nursery), store)
            kernel.daemon = daemon
            await test(kernel)
            nursery.cancel_scope.cancel()
    try:
        with inline_threads():
            trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0 if autojump else math.inf))
    finally:
        remove_folder(folder)


async def crash(k: Kernel) -> None:
    """SIGKILL of the daemon (and of every program using the mount); the daemon starts again."""
    k.core = await k.daemon.restart()
    k.descs.clear()


async def sync(k: Kernel) -> None:
    """S3 is well again; wait (trio time, retries' backoff included) until the spool drained."""
    k.store.heal()
    await drain_spool(k.core)


async def written(k: Kernel, path: str, data: bytes) -> None:
    """`cp`: create, write, close; with write-back it returns once the file is in the spool.
    Then, once no other close follows within BURST_GAP (trio time moves that far: no upload
    starts while a copy is under way), its background upload makes its first attempt (done,
    or failed: retried in 1 s of trio time, which otherwise stands still), so what comes next
    does not race with it (see WB1)."""
    fh = await k.create(path)
    await k.core.write(fh, 0, data)
    await k.close(fh)
    await trio.testing.wait_all_tasks_blocked()
    trio.lowlevel.current_clock().jump(writeback.BURST_GAP)
    await trio.testing.wait_all_tasks_blocked()


async def while_a_retry_starts(k, operation, *args) -> None:
    """WB1's race: `a` spooled over an older `a` in S3, its first PUT failed (retried in 1 s);
    `operation` deletes the old object, and while that DELETE is on the wire the retry's PUT
    goes out. Then both go on, and the spool drains."""
    k.store.add("Incoming/a", b"old")
    await k.listing("Incoming")
    k.store.fail_once.add("put")
    await written(k, "Incoming/a", b"new")
    deleting, putting = trio.Event(), trio.Event()
    k.store.gates.update(delete=deleting, put=putting)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(operation, *args)
        while "delete" not in k.store.arrived:
            await trio.sleep(0)
        trio.lowlevel.current_clock().jump(1)  # the retry: its PUT reaches its gate
        await trio.testing.wait_all_tasks_blocked()
        deleting.set()
        await trio.testing.wait_all_tasks_blocked()
        putting.set()
    await sync(k)


def test_wb_unlink_while_the_upload_starts_deletes_the_file():
    """WB1: `a` spooled (its first upload failed: retried in 1 s) over an older `a` in S3;
    `rm a` deletes the old object, and while that DELETE is on the wire the retry starts and
    its PUT goes out. The unlink then detaches the file in the middle of its upload (it
    settled before the upload began); the PUT lands: the deleted name is back in S3 (before
    8afa560), or writeback.uploaded() finds no journal (AttributeError) and the uploader's
    nursery, the daemon's, dies. Promised (SEMANTICS): a delete during the upload waits for
    it; a deleted name never comes back."""
    async def test(k):
        await while_a_retry_starts(k, k.unlink, "Incoming/a")
        assert k.stored("Incoming/a") is None
        assert "a" not in await k.listing("Incoming")
    run_wb(test)


def test_wb_rename_while_the_upload_starts_moves_the_file():
    """WB1 (rename): as above with `mv a b`: the rename deletes the old `a`, renames the
    spooled file and its journal, but the PUT already under way was for `a`: S3 ends with
    the new content under `a` and no `b`; the mount then lists `a`, not `b`."""
    async def test(k):
        await while_a_retry_starts(k, k.rename, "Incoming/a", "Incoming/b")
        assert k.stored("Incoming/b") == b"new" and k.stored("Incoming/a") is None
        assert await k.listing("Incoming") == {"b": 3}
    run_wb(test)


def test_wb_spooled_file_renamed_to_a_temporary_name_is_not_sent():
    """WB2: `a` spooled (S3 down), `mv a a.part`: the journal takes the temporary name and the
    upload PUTs `Incoming/a.part`. Promised (README): a temporary name never reaches S3; a
    file renamed to one is kept back."""
    async def test(k):
        k.store.failing.add("put")
        await written(k, "Incoming/a", b"x")
        await k.rename("Incoming/a", "Incoming/a.part")
        await sync(k)
        assert k.stored("Incoming/a.part") is None and k.stored("Incoming/a") is None
        assert await k.listing("Incoming") == {"a.part": 1}
    run_wb(test)


def test_wb_folder_rename_with_a_spooled_file_moves_it():
    """WB3: `d/a` spooled (S3 down), `mv d e`: EBUSY ("holds d/a, not uploaded yet"); with
    write-back a copy into a folder is followed by that for as long as the uploads take.
    Promised (SEMANTICS, write-back): a rename before the upload is applied to the spool."""
    async def test(k):
        await k.mkdir("Incoming/d")
        k.store.fail_once.add("put")  # (once: the new folder's marker is a PUT too)
        await written(k, "Incoming/d/a", b"x")
        await k.rename("Incoming/d", "Incoming/e")
        await sync(k)
        assert k.stored("Incoming/e/a") == b"x" and k.stored("Incoming/d/a") is None
    run_wb(test)


def test_wb_spooled_file_reopened_for_writing_survives_a_crash():
    """WB4: `a` closed (spooled; S3 down), opened again read-write (an editor, a log being
    appended to), then the daemon dies: `a` is in neither S3 nor the spool. Opening it for
    writing took it out of the spool (the spool's data file is its staging file, changed in
    place), so a close that had returned is undone; a `sync` while it is open does not send
    it either. Promised (README, write-back): files whose close() returned are uploaded."""
    async def test(k):
        k.store.failing.add("put")
        await written(k, "Incoming/a", b"v1")
        await k.open("Incoming/a", os.O_RDWR)
        await crash(k)
        await sync(k)
        assert k.stored("Incoming/a") == b"v1"
    run_wb(test)


def test_wb_rename_of_a_file_failed_for_good_moves_it_in_the_spool():
    """WB5: `a`'s upload refused for good (403: FAILED, kept in the spool), `mv a b`: ENOENT
    (the rename copies `a` in S3, which has none); had S3 an older `a`, `b` would get that
    stale object. Promised: a rename of a file only the spool holds is applied to the spool
    (it goes up as `b` at the next start); S3 shows nothing it was not sent."""
    async def test(k):
        k.store.denied.add("put")
        await written(k, "Incoming/a", b"x")
        assert k.core.files.get("Incoming/a").state is State.FAILED
        await k.rename("Incoming/a", "Incoming/b")
        assert k.stored("Incoming/a") is None and k.stored("Incoming/b") is None
        assert await k.listing("Incoming") == {"b": 1}
        await crash(k)  # a failed upload is tried again at the next start
        await sync(k)
        assert k.stored("Incoming/b") == b"x" and k.stored("Incoming/a") is None
    run_wb(test)


def test_wb_a_file_spooled_twice_survives_a_crash():
    """WB6: `a` spooled (S3 down), `truncate -s 1 a` (spooled again), SIGKILL: after the
    start `a` is gone. Its staging file was linked into the spool once; Linux links an
    O_TMPFILE file only once (I_LINKABLE), so the second Spool.add falls back to a copy, and
    then sets the journal xattr on the staging descriptor, not on the copy; the next start
    finds a data file without a journal and removes it. So does any file written again after
    its upload while held (still open), or restored after a crash and changed."""
    async def test(k):
        k.store.failing.add("put")
        await written(k, "Incoming/a", b"v1")
        await k.truncate("Incoming/a", 1)
        await crash(k)
        await sync(k)
        assert k.stored("Incoming/a") == b"v"
    run_wb(test)


def test_wb_a_file_failed_for_good_does_not_hold_closes_forever():
    """WB7: a spool of 10 bytes; `a` (8 bytes) refused for good (FAILED, kept in the spool);
    S3 well again; `cp b` (8 bytes): its close waits for room, and none ever comes (a failed
    file leaves the spool only at the next start, when it is tried again): the program hangs
    in close() (an hour of trio time here; for ever). After a 403 every upload fails for good,
    so the spool fills with failed files and then every close hangs. Promised (README): a
    close waits for uploads to make room; when no upload can, it must end (sent, or failed)."""
    async def test(k):
        k.store.denied.add("put")
        await written(k, "Incoming/a", b"12345678")
        assert k.core.files.get("Incoming/a").state is State.FAILED
        k.store.heal()
        with trio.move_on_after(3600) as waiting:
            with contextlib.suppress(MinervaError):  # (a refusal, ENOSPC say, ends it too)
                await written(k, "Incoming/b", b"abcdefgh")
        assert not waiting.cancelled_caught, "the close of b waited an hour for room"
    run_wb(test, cap=10, autojump=True)


class Killed(BaseException):
    """The daemon dies here (SIGKILL): no code of it runs after this."""


def test_wb_a_change_to_a_spooled_file_leaves_the_last_close_whole_at_a_crash():
    """WB8: `a` spooled ("v1"; S3 down), `truncate -s 1 a`, and the daemon is killed right
    after the truncate's ftruncate(2): at the next start `a` is gone ("not whole; left in
    place"). The change is made to the spool's own data file (it is the staging file) before
    the file is taken out of the spool (core._truncate, fileops._open_writer's O_TRUNC and
    StagedHandle.write change first, then call LocalFiles.changed), so the journal names a
    file of another size. Promised: the last close (v1) is uploaded; the truncate, which
    never returned, may or may not be."""
    async def test(k):
        k.store.failing.add("put")
        await written(k, "Incoming/a", b"v1")
        disk = k.daemon.disk
        real = disk.ftruncate

        def dies_after(fd, size):
            real(fd, size)
            raise Killed

        disk.ftruncate = dies_after
        with pytest.raises(Killed):
            await k.truncate("Incoming/a", 1)
        await crash(k)
        await sync(k)
        assert k.stored("Incoming/a") in (b"v1", b"v")
    run_wb(test)


def test_wb_changed_file_renamed_to_a_final_name_shows_no_old_bytes_there():
    """WB9 (the 20,000-example run): `a.part` in S3 ("old", a pipeline's), truncated to 0 here
    (held, kept back: a temporary name); S3 refuses uploads; `mv a.part a`: the rename copies
    the old object to `a` (so the held copy could still fill from it), then spools the new
    content. Until the upload (for ever, if it fails for good) S3 shows `a` with bytes the
    file never had under that name. A changed file that goes up at the rename needs no copy:
    its bytes are brought here (as the upload does anyway). Promised (README): each file
    appears in S3 whole, once, under its final name."""
    async def test(k):
        k.store.add("Incoming/a.part", b"old")
        await k.truncate("Incoming/a.part", 0)
        k.store.failing.add("put")
        await k.rename("Incoming/a.part", "Incoming/a")
        await trio.testing.wait_all_tasks_blocked()
        assert k.stored("Incoming/a") in (None, b"")
        await sync(k)
        assert k.stored("Incoming/a") == b"" and k.stored("Incoming/a.part") is None
    run_wb(test)


def test_wb_folder_rename_shows_no_old_bytes_of_a_spooled_file():
    """WB10 (the model, on 463ca99): `e/a` uploaded ("old"), written again ("new", spooled;
    S3 down), `mv e d`: the folder move copies every object under `e/`, the superseded "old"
    too: S3 shows `d/a` with the old bytes until the upload (for ever if it fails for good).
    As WB9 for a single file: a spooled file's object is deleted, not copied; its content goes
    up under the new name."""
    async def test(k):
        await k.mkdir("Incoming/e")
        await written(k, "Incoming/e/a", b"old")
        assert k.stored("Incoming/e/a") == b"old"
        k.store.fail_once.add("put")
        await written(k, "Incoming/e/a", b"new")
        await k.rename("Incoming/e", "Incoming/d")
        assert k.stored("Incoming/d/a") is None and k.stored("Incoming/e/a") is None
        await sync(k)
        assert k.stored("Incoming/d/a") == b"new" and k.stored("Incoming/e/a") is None
        assert await k.listing("Incoming/d") == {"a": 3}
    run_wb(test)


def test_wb_an_unexpected_error_in_an_upload_keeps_the_file_and_the_mount():
    """A bug in one upload (any exception not a MinervaError) killed the uploader's nursery,
    the daemon's: the mount went down (as WB1's AttributeError did). Now the file is kept in
    the spool as failed (tried again at the next start) and the uploads of others go on."""
    async def test(k):
        real = k.store.put

        async def broken(path, data, metadata):
            raise RuntimeError("a bug")
        k.store.put = broken
        await written(k, "Incoming/a", b"x")
        assert k.core.files.get("Incoming/a").state is State.FAILED
        k.store.put = real
        await written(k, "Incoming/b", b"y")
        await sync(k)
        assert k.stored("Incoming/b") == b"y" and k.stored("Incoming/a") is None
    run_wb(test)


def test_a_truncate_by_path_reaches_the_reader_of_a_file_sent_unchanged(tmp_path):
    """M34 (a 5,000-example random run after M32's fix): `.a.swp` created O_RDONLY and kept
    open, `mv .a.swp a` (sent at the rename without an upload of its own: it was empty), an
    `rm a` that S3 refuses, `truncate -s 1 a`: the descriptor read b"". M32's fix went back to
    S3's object only for a file whose staging copy knew it; this one's did not, and it was
    detached as a stream would be. A held file's readers keep it, whatever it started from."""
    async def test(k):
        k.store.failing.add("delete")
        fh = await k.create("Incoming/.a.swp", os.O_RDONLY | os.O_CREAT)
        await k.rename("Incoming/.a.swp", "Incoming/a")
        await fails_with(errno.EIO, k.unlink("Incoming/a"))
        await k.truncate("Incoming/a", 1)
        assert bytes(await k.core.read(fh, 0, 1)) == b"\0"
    run(test, tmp_path)
