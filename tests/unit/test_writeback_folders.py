"""Write-back: folders made through the mount, and when uploads start.

`mkdir` spools the folder's marker (`dir/`, empty) like a file instead of waiting a round trip
for its PUT: a `cp -r` far from the region starts copying at once. Promised (SEMANTICS,
write-back): the folder is there from the moment mkdir returns, survives a crash, and is in
S3 once the spool drains; rmdir and rename of it act on the spool first.

And uploads wait while a copy is under way (writeback.BURST_HOLD): a copy of a few hundred
small files is over before any upload competes with it for the CPU.

Core over a ModelStore on a MockClock (test_core_regressions' Kernel, run_wb, crash, sync).
"""

import errno

import pytest
import trio
import trio.testing
from test_core_regressions import crash, run_wb, sync, written

from minerva_mount import writeback
from minerva_mount.errors import MinervaError


def made(k) -> list[str]:
    """Keys of objects the mount has made (PUT, copy, completed upload) so far."""
    return [key for _, key in k.store.writes]


def test_mkdir_sends_nothing_and_the_folder_shows_until_its_marker_is_in_s3():
    async def test(k):
        await k.listing("Incoming")
        await k.mkdir("Incoming/d")
        assert made(k) == []  # no round trip in mkdir
        assert "d" in await k.listing("Incoming")
        await k.core.listings.refresh_once()  # S3's listing has no `d` yet: still shown
        assert "d" in await k.listing("Incoming")
        assert await k.listing("Incoming/d") == {}
        await sync(k)
        assert k.stored("Incoming/d/") == b""
        assert "d" in await k.listing("Incoming")
    run_wb(test)


def test_a_folder_made_before_a_crash_is_there_after_it():
    async def test(k):
        k.store.failing.add("put")  # nothing leaves the spool
        await k.mkdir("Incoming/d")
        await k.mkdir("Incoming/d/e")
        await crash(k)
        assert await k.listing("Incoming/d") == {"e": 0}
        await sync(k)
        assert k.stored("Incoming/d/") == b"" and k.stored("Incoming/d/e/") == b""
    run_wb(test)


def test_rmdir_of_a_folder_whose_marker_was_never_sent_leaves_nothing():
    async def test(k):
        k.store.failing.add("put")
        await k.mkdir("Incoming/d")
        await k.rmdir("Incoming/d")
        assert "d" not in await k.listing("Incoming")
        await sync(k)
        assert made(k) == [] and k.stored("Incoming/d/") is None
        assert list(k.core.files) == []
    run_wb(test)


def test_rmdir_waits_for_a_marker_upload_under_way_then_removes_it():
    async def test(k):
        gate = k.store.gates["put"] = trio.Event()
        await k.mkdir("Incoming/d")
        trio.lowlevel.current_clock().jump(writeback.BURST_GAP)
        await trio.testing.wait_all_tasks_blocked()
        assert k.store.arrived["put"].is_set()  # the marker's PUT is on its way
        async with trio.open_nursery() as nursery:
            nursery.start_soon(k.rmdir, "Incoming/d")
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
        assert k.stored("Incoming/d/") is None
        assert "d" not in await k.listing("Incoming")
    run_wb(test)


def test_a_pending_folder_with_files_is_not_empty_and_moves_whole():
    async def test(k):
        k.store.failing.add("put")
        await k.mkdir("Incoming/d")
        await k.mkdir("Incoming/d/e")
        await written(k, "Incoming/d/e/a", b"x")
        with pytest.raises(MinervaError) as refused:
            await k.rmdir("Incoming/d")
        assert refused.value.errno == errno.ENOTEMPTY
        await k.mkdir("Incoming/t")  # an empty folder as the target: replaced
        k.store.heal()  # (the rename sends the markers with its copies)
        await k.rename("Incoming/d", "Incoming/t")
        assert await k.listing("Incoming/t/e") == {"a": 1}
        await crash(k)
        await sync(k)
        assert k.stored("Incoming/t/e/a") == b"x" and k.stored("Incoming/t/e/") == b""
        assert sorted(key for key in k.store.objects) == ["Incoming/t/", "Incoming/t/e/", "Incoming/t/e/a"]
    run_wb(test)


async def copy(k, count: int) -> None:
    """`cp` of `count` files, a close every BURST_GAP / 4 of trio time."""
    for i in range(count):
        fh = await k.create(f"Incoming/f{i}")
        await k.core.write(fh, 0, b"x")
        await k.close(fh)
        await trio.testing.wait_all_tasks_blocked()
        trio.lowlevel.current_clock().jump(writeback.BURST_GAP / 4)
        await trio.testing.wait_all_tasks_blocked()


def test_no_upload_starts_while_a_copy_is_under_way():
    """Closes less than BURST_GAP apart: nothing goes up during the first BURST_HOLD; once
    the closes stop, every file goes."""
    async def test(k):
        await copy(k, 20)
        assert made(k) == []
        trio.lowlevel.current_clock().jump(writeback.BURST_GAP)
        await sync(k)
        assert sorted(made(k)) == sorted(f"Incoming/f{i}" for i in range(20))
    run_wb(test)


def test_a_long_copy_still_uploads_as_it_goes():
    async def test(k):
        await copy(k, int(writeback.BURST_HOLD / (writeback.BURST_GAP / 4)) + 20)
        assert made(k)  # some went up before the copy ended
    run_wb(test)
