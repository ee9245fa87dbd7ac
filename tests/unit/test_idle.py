"""The idle-priority worker the block cache writes with."""

import os
import threading

import pytest
import trio

from minerva_mount.idle import IdleWorker


def test_jobs_run_in_one_idle_priority_thread_which_ends_when_unused():
    worker = IdleWorker("test idle", linger=0.05)
    seen = []

    def job(n):
        seen.append((threading.current_thread().name, os.sched_getscheduler(0)))
        return n * 2

    def fails():
        raise OSError(28, "No space left on device")

    async def main():
        assert [await worker.run(job, n) for n in range(3)] == [0, 2, 4]
        with pytest.raises(OSError, match="No space left"):
            await worker.run(fails)
        with trio.fail_after(5):  # lingers 50 ms, then ends
            while worker._thread is not None:
                await trio.sleep(0.01)
        assert await worker.run(job, 5) == 10  # started again on demand
    trio.run(main)
    assert seen == [("test idle", os.SCHED_IDLE)] * 4
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the caller's thread is untouched
