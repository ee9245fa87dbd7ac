"""Write-back findings of helpers 10-12 (set on breaking spooled folder markers,
upload pacing, folder renames and spare staging files), each pinned: WB11-WB21. Core over
a ModelStore on a MockClock, as in test_core_regressions.py (whose Kernel, run_wb, written,
sync and fails_with these use).
"""

import contextlib
import errno
import os
import threading

import pytest
import trio
import trio.testing
from model_support import quiet_logs, set_small_parts, ttl_passes
from test_core_regressions import fails_with, run_wb, sync, written
from wb_support import drain_spool

from minerva_mount import staging, writeback
from minerva_mount.errors import MinervaError, StoreError
from minerva_mount.staging import StagingArea


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


def test_wb16_a_folder_rename_leaves_a_file_another_rename_moved_out_to_it():
    """WB16 (helper-11): `d/x` spooled over an older `d/x`; `mv d/x y` waits for its DELETE
    while `mv d e` starts: the folder rename waited to hold `x`, then took it although it was
    `y` by then, and sent it as `Incoming/e`. Promised: each file once, under its name."""
    async def test(k):
        k.store.add("Incoming/d/x", b"old")
        await k.listing("Incoming/d")
        fh = await k.create("Incoming/d/x")
        await k.core.write(fh, 0, b"new")
        await k.close(fh)
        await trio.testing.wait_all_tasks_blocked()
        gate = k.store.gates["delete"] = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(k.rename, "Incoming/d/x", "Incoming/y")
            while "delete" not in k.store.arrived:
                await trio.sleep(0)
            nursery.start_soon(k.rename, "Incoming/d", "Incoming/e")
            await trio.testing.wait_all_tasks_blocked()
            del k.store.gates["delete"]
            gate.set()
        await sync(k)
        assert sorted(k.store.objects) == ["Incoming/e/", "Incoming/y"]
        assert k.stored("Incoming/y") == b"new"
    run_wb(test)


def test_wb17_a_folder_rename_beside_a_close_waiting_for_spool_room_ends():
    """WB17 (helper-11): spool of 10 bytes, `d/a` (8) spooled, the close of `d/b` (5) waits
    for room, then `mv d e`: the rename held `a` still while it waited for `b`, whose room
    only `a`'s upload could make: `mv`, the close and every later close waited for ever."""
    async def test(k):
        await k.mkdir("Incoming/d")
        fa = await k.create("Incoming/d/a")
        await k.core.write(fa, 0, b"a" * 8)
        await k.close(fa)  # spooled; its upload waits for the copy's pause (trio time stands)
        fb = await k.create("Incoming/d/b")
        await k.core.write(fb, 0, b"b" * 5)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(k.close, fb)  # waits for room
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(k.rename, "Incoming/d", "Incoming/e")
            await trio.testing.wait_all_tasks_blocked()
            with trio.move_on_after(600) as waited:  # ten minutes of trio time, moving
                await drain_spool(k.core)
            nursery.cancel_scope.cancel()
        assert not waited.cancelled_caught, [(f.path, f.state.value) for f in k.core.files]
        assert k.stored("Incoming/e/a") == b"a" * 8 and k.stored("Incoming/e/b") == b"b" * 5
    run_wb(test, cap=10)


def test_wb18_a_long_copy_uploads_as_it_goes_though_two_files_keep_failing():
    """WB18 (helper-11): a copy of closes 10 ms apart, its first two files' PUTs failing
    (retried with backoff): they kept both upload slots of the burst through their backoff,
    and none of the other 3,000 went up during the 30 s copy. Promised (SEMANTICS): a long
    copy still uploads as it goes."""
    async def test(k):
        await k.listing("Incoming")
        real_put = k.store.put

        async def put(path, data, *args, **kwargs):
            if path.startswith("Incoming/bad"):
                raise StoreError(f"put {path}: 500 InternalError (test)")
            return await real_put(path, data, *args, **kwargs)
        k.store.put = put
        for name in ["bad1", "bad2"] + [f"f{i:04}" for i in range(3000)]:
            fh = await k.create(f"Incoming/{name}")
            await k.core.write(fh, 0, b"x")
            await k.close(fh)
            await trio.testing.wait_all_tasks_blocked()
            trio.lowlevel.current_clock().jump(0.01)
        await trio.testing.wait_all_tasks_blocked()
        assert len([key for key in k.store.objects if key.startswith("Incoming/f")]) > 1000
    run_wb(test)


def test_wb19_spare_staging_files_come_back_after_a_full_disk():
    """WB19 (helper-11): after making a spare failed (ENOSPC) with none left, none was taken,
    so none was ever made again: every create paid for its file on the event loop."""
    area = StagingArea.private_temporary()
    full, refused, real = [True], threading.Event(), area._make_file

    def make():
        if full[0]:
            refused.set()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real()
    area._make_file = make
    made = []

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(area.keep_spares)
            with trio.fail_after(10):  # (made in a thread: poll, with a deadline)
                while not refused.is_set():
                    await trio.sleep(0.001)
            await trio.testing.wait_all_tasks_blocked()  # keep_spares waits for a create
            assert area._spares == []
            full[0] = False  # room again
            made.append(area.new_file())  # a create goes on
            with trio.fail_after(10):  # (spares are made in a thread: poll, with a deadline)
                while len(area._spares) < staging.SPARES:
                    await trio.sleep(0.001)
            nursery.cancel_scope.cancel()
    trio.run(main)
    os.close(made[0])


def test_wb20_a_folder_rename_beside_files_saved_again_and_again_ends():
    """WB20 (helper-12): `a` and `b` in `d` saved every 0.3 s (each PUT taking 1 s), `mv d e`:
    the rename waited for one to settle while the other's upload began, for ever. Promised:
    mv ends, moved or refused (EBUSY, logged), and nothing is lost either way."""
    async def test(k):
        await k.mkdir("Incoming/d")
        real_put = k.store.put

        async def slow_put(path, data, *args, **kwargs):
            await trio.sleep(1.0)
            return await real_put(path, data, *args, **kwargs)
        k.store.put = slow_put
        ended = []

        async def saver(name, offset):
            await trio.sleep(offset)
            path = f"Incoming/d/{name}"
            await written(k, path, b"v")
            await k.open(path, os.O_RDONLY)  # a reader keeps it held
            for i in range(1, 100):
                await trio.sleep(0.3)
                path = f"Incoming/{'e' if ended == ['moved'] else 'd'}/{name}"
                fh = await k.open(path, os.O_WRONLY | os.O_TRUNC)
                await k.core.write(fh, 0, b"v%d" % i)
                await k.close(fh)

        async def mv():
            await trio.sleep(5)
            try:
                await k.rename("Incoming/d", "Incoming/e")
                ended.append("moved")
            except MinervaError as exc:
                assert exc.errno == errno.EBUSY
                ended.append("refused")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(saver, "a", 0.0)
            nursery.start_soon(saver, "b", 0.5)
            nursery.start_soon(mv)
            with trio.move_on_after(300):
                while not ended:
                    await trio.sleep(1)
            nursery.cancel_scope.cancel()
        assert ended, "mv of the folder did not end within 300 s of trio time"
    run_wb(test, autojump=True)


@pytest.mark.parametrize("flags", [os.O_WRONLY | os.O_TRUNC, os.O_RDWR])
def test_wb21_a_file_opened_while_its_upload_is_on_the_wire_is_written(flags):
    """WB21 (helper-12, older): `a` spooled, its PUT on the wire, `open(a)` for writing: the
    open waited for the upload, whose end dropped the file and closed its staging descriptor,
    and the open then used that descriptor (EIO: Bad file descriptor; a reused descriptor
    would have been another file's). Promised: the open and the write succeed."""
    async def test(k):
        gate = k.store.gates["put"] = trio.Event()
        await written(k, "Incoming/a", b"old")  # its PUT waits at the gate
        assert "put" in k.store.arrived
        async with trio.open_nursery() as nursery:
            async def opener():
                fh = await k.open("Incoming/a", flags)
                await k.core.write(fh, 0, b"NEW")
                await k.close(fh)
            nursery.start_soon(opener)
            await trio.testing.wait_all_tasks_blocked()
            del k.store.gates["put"]
            gate.set()
        await sync(k)
        assert k.stored("Incoming/a") == b"NEW"
    run_wb(test)
