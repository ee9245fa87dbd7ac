"""Write-back findings of helper-10 (set on breaking spooled folder markers and upload
pacing), each pinned: WB11-WB15. Core over a ModelStore on a MockClock, as in
test_core_regressions.py (whose Kernel, run_wb, written, sync and fails_with these use).
"""

import contextlib
import errno
import os

import pytest
import trio
import trio.testing
from model_support import quiet_logs, set_small_parts, ttl_passes
from test_core_regressions import fails_with, run_wb, sync, written
from wb_support import drain_spool

from minerva_mount import writeback
from minerva_mount.errors import MinervaError


@pytest.fixture(autouse=True)
def small_parts(monkeypatch):
    set_small_parts(monkeypatch)
    with quiet_logs():
        yield


async def rename_as_uploads_land(k, src: str, dst: str, jump: float) -> None:
    """`mv src dst`, with S3's answer to the rename's LIST on its way back while trio time
    moves `jump` (a copy's pause ends, a retry comes due) and the uploads then due land."""
    answered, release = trio.Event(), trio.Event()
    real = k.store.list_tree

    async def list_tree(prefix):
        result = await real(prefix)
        answered.set()
        await release.wait()
        return result
    k.store.list_tree = list_tree
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.rename, src, dst)
        await answered.wait()
        k.store.list_tree = real
        trio.lowlevel.current_clock().jump(jump)
        await trio.testing.wait_all_tasks_blocked()
        release.set()


def test_wb11_a_folder_renamed_as_its_copy_starts_uploading_moves_whole():
    """WB11: `cp -r` into a new folder `d` (all spooled), then at once `mv d e`: the copy's
    pause ended while the rename's LIST was answered, the uploads went to `d/a`, `d/b`, and
    after sync S3 held them under `d` and nothing under `e` but its marker. Promised: a
    rename before the upload is applied to the spool; nothing is left under the old name."""
    async def test(k):
        await k.listing("Incoming")
        await k.mkdir("Incoming/d")
        for name in ("a", "b"):
            fh = await k.create(f"Incoming/d/{name}")
            await k.core.write(fh, 0, b"x")
            await k.close(fh)
        await trio.testing.wait_all_tasks_blocked()
        await rename_as_uploads_land(k, "Incoming/d", "Incoming/e", jump=writeback.BURST_GAP)
        await sync(k)
        assert k.stored("Incoming/e/a") == b"x" and k.stored("Incoming/e/b") == b"x"
        assert [key for key in k.store.objects if key.startswith("Incoming/d")] == []
    run_wb(test)


def test_wb12_a_folder_rename_checks_the_keys_of_what_only_the_spool_holds():
    """WB12: folders made with write-back and not in S3 yet, `mv` to a name that makes a key
    too long: the rename passed (only S3's objects were checked). Promised (SEMANTICS):
    every resulting key is checked first; ENAMETOOLONG, nothing sent."""
    async def test(k):
        k.store.failing.add("put")  # the markers stay in the spool
        path = "Incoming/d"
        await k.mkdir(path)
        for part in ("a" * 250, "b" * 250, "c" * 250):
            path += "/" + part
            await k.mkdir(path)
        await fails_with(errno.ENAMETOOLONG, k.rename("Incoming/d", "Incoming/" + "e" * 250))
        assert k.store.writes == []
    run_wb(test)


def test_wb13_mkdir_does_not_wait_for_spool_room():
    """WB13: a file larger than the spool's cap (let in alone) waiting for S3; `mkdir` waited
    for room it does not take. Promised: a close (and a mkdir) waits only for room it needs."""
    async def test(k):
        k.store.failing.update({"put", "create_multipart", "upload_part", "complete_multipart"})
        await written(k, "Incoming/big", b"0123456789abcdefghij")  # 20 bytes, cap 10
        with trio.move_on_after(3600) as waiting:
            await k.mkdir("Incoming/d")
        assert not waiting.cancelled_caught, "mkdir waited an hour of trio time for spool room"
    run_wb(test, cap=10, autojump=True)


def test_wb14_a_failed_rename_of_a_new_folder_leaves_the_copy_a_folder():
    """WB14: `mkdir d` (marker spooled), `d/a` in S3, `mv d e` fails half way (DELETE refused):
    `e/a` was copied but `e/` was not, so `rm e/a` made `e` vanish. In write-through `d/` is
    copied first. Promised: a failed folder rename leaves both folders whole."""
    async def test(k):
        await k.mkdir("Incoming/d")
        k.store.add("Incoming/d/a", b"")
        ttl_passes(k.core)
        k.store.failing.add("delete")
        await fails_with(errno.EIO, k.rename("Incoming/d", "Incoming/e"))
        k.store.heal()
        await k.unlink("Incoming/e/a")
        ttl_passes(k.core)
        assert {"d", "e"} <= set(await k.listing("Incoming"))
    run_wb(test)


def test_wb15_a_spooled_file_put_back_after_a_refused_rename_onto_it_is_uploaded():
    """WB15 (older than the markers): `b` spooled, its retry due; `mv a b` sets `b` aside, and
    `b`'s retry, finding it aside, ended its upload task; the rename's DELETE fails, `b` is put
    back spooled with no task: `sync` never ended. Promised: every spooled file is uploaded."""
    async def test(k):
        k.store.add("Incoming/a", b"old")
        await k.listing("Incoming")
        k.store.failing.add("put")
        fh = await k.open("Incoming/a", os.O_RDWR)
        await k.core.write(fh, 0, b"new")
        await k.close(fh)
        await written(k, "Incoming/b", b"bbb")  # (its PUT failed: retried in 1 s)
        gate = k.store.gates["delete"] = trio.Event()
        async with trio.open_nursery() as nursery:
            async def mv():
                with contextlib.suppress(MinervaError):
                    await k.rename("Incoming/a", "Incoming/b")
            nursery.start_soon(mv)
            while "delete" not in k.store.arrived:
                await trio.sleep(0)
            trio.lowlevel.current_clock().jump(1)  # b's retry comes due while b is aside
            await trio.testing.wait_all_tasks_blocked()
            k.store.fail_once.add("delete")
            gate.set()
        del k.store.gates["delete"]
        k.store.heal()
        await drain_spool(k.core)
        assert k.stored("Incoming/b") == b"bbb" and k.stored("Incoming/a") == b"new"
    run_wb(test)
