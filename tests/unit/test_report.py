"""Unit tests of what status reports (over the fake store) and of sd_notify's wire format."""

import datetime as dt
import logging
import os
import socket
from types import SimpleNamespace

import trio
import trio.testing

from minerva_mount import notify
from minerva_mount.core import Core
from minerva_mount.fakestore import FakeStore
from minerva_mount.multipart import MIN_PART
from minerva_mount.namespace import ROOT_INODE
from minerva_mount.report import RecentFailures, one_line, snapshot

WRITE_NEW = os.O_WRONLY | os.O_CREAT | os.O_TRUNC


def provider():
    expiration = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    creds = SimpleNamespace(bucket="b", prefix="acme/", expiration=expiration, seconds_left=lambda: 3600.0)
    return SimpleNamespace(current=creds, refreshes=1, last_error=None)


def test_snapshot_counts_bytes_written_and_uploaded_then_the_completed_file():
    failures = RecentFailures()

    async def main():
        async with trio.open_nursery() as nursery:
            core = Core(FakeStore(), nursery)
            incoming = (await core.lookup(ROOT_INODE, b"Incoming")).inode
            fh, _ = await core.create(incoming, b"a.bin", WRITE_NEW)
            await core.write(fh, 0, b"x" * (MIN_PART + 5))
            await trio.testing.wait_all_tasks_blocked()
            report = snapshot(mountpoint="/m", started=0, core=core, provider=provider(), failures=failures)
            [upload] = report["uploads"]
            assert upload["path"] == "Incoming/a.bin" and upload["written"] == MIN_PART + 5
            assert upload["uploaded"] == MIN_PART and upload["total"] is None and upload["eta"] is None
            assert "1 uploads in progress, 0 done" in one_line(report)
            await core.flush(fh)
            await core.release(fh)
            report = snapshot(mountpoint="/m", started=0, core=core, provider=provider(), failures=failures)
            assert report["uploads"] == [] and report["uploads_completed"] == 1
            assert report["area"] == "s3://b/acme/" and report["credentials"]["seconds_left"] == 3600
            assert report["cache"]["hits"] == report["cache"]["misses"] == 0  # block cache, no reads yet
            assert report["cache"]["skipped_writes"] == 0
            nursery.cancel_scope.cancel()
    trio.run(main)


def test_cache_stats_reported_when_the_core_has_them_and_survives_their_failure():
    core = SimpleNamespace(files=SimpleNamespace(unfinished=list, in_progress=list, completed=0),
                           store=SimpleNamespace(requests={"get": 2}),
                           cache_stats=lambda: {"bytes": 10, "hits": 3, "misses": 1})
    report = snapshot(mountpoint="/m", started=0, core=core, provider=provider(), failures=RecentFailures())
    assert report["cache"] == {"bytes": 10, "hits": 3, "misses": 1} and report["requests"] == {"get": 2}

    def broken():
        raise RuntimeError("cache busy")
    core.cache_stats = broken
    report = snapshot(mountpoint="/m", started=0, core=core, provider=provider(), failures=RecentFailures())
    assert "cache busy" in report["cache"]["error"]


def test_recent_failures_keep_the_last_warnings_and_errors_only():
    failures = RecentFailures(maxlen=3).install()
    log = logging.getLogger("minerva.test")
    try:
        log.info("not a failure")
        for i in range(5):
            log.warning("refused %d", i)
        log.error("upload of %s failed", "Incoming/x")
    finally:
        failures.remove()
    assert [e["message"] for e in failures.entries] == [
        "refused 3", "refused 4", "upload of Incoming/x failed"]
    assert failures.errors == 1 and failures.entries[-1]["level"] == "ERROR"


def test_notify_sends_one_datagram_per_call(tmp_path, monkeypatch):
    path = tmp_path / "n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert notify.ready("mounted\nsomewhere")
        assert notify.stopping("bye")
        assert sock.recv(4096).decode().splitlines()[:2] == ["READY=1", "STATUS=mounted somewhere"]
        assert sock.recv(4096).decode().splitlines() == ["STOPPING=1", "STATUS=bye"]
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert notify.status("nobody listens") is False
