"""The daemon killed or stopped mid-upload: nothing half-published, the mount point reusable."""

import contextlib
import errno
import os
import signal

import pytest
from helpers import wait_for


def _stat_errno(path) -> int:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno
    return 0


def test_sigkill_during_upload_leaves_no_object_and_the_mount_point_works_again(
        mount, mount_factory, local_minerva):
    target = mount.path / "Incoming" / "killed.bin"
    # Held open mid-upload (a cp could finish before the kill lands on a fast machine).
    writer = open(target, "wb", buffering=0)  # noqa: SIM115 (closed below, after the kill)
    try:
        writer.write(os.urandom(40 << 20))  # more than one part: the multipart upload is under way
        mount.proc.send_signal(signal.SIGKILL)
        mount.proc.wait(30)
    except BaseException:
        with contextlib.suppress(OSError):
            writer.close()
        raise
    with pytest.raises(OSError):  # close() fails: the application does not see a silent success
        writer.close()
    # The kernel answers from its cached attributes of the root for up to a second.
    wait_for(lambda: _stat_errno(mount.path) == errno.ENOTCONN, "the dead mount to answer ENOTCONN")
    assert local_minerva.keys("Incoming/") == []

    again = mount_factory(name=mount.path.name)  # same mount point, at once
    assert sorted(os.listdir(again.path)) == ["Incoming", "Outgoing"]
    assert "dead mount left by an earlier run" in again.log()
    (again.path / "Incoming" / "after.txt").write_bytes(b"fine")
    assert local_minerva.get("Incoming/after.txt") == b"fine"
    assert local_minerva.keys("Incoming/") == ["Incoming/after.txt"]


def test_sigterm_logs_the_upload_that_cannot_finish_within_the_stop_timeout(mount_factory, local_minerva):
    local_minerva.wipe()
    mount = mount_factory(extra=("--stop-timeout", "2"))
    target = mount.path / "Incoming" / "still-open.bin"
    f = open(target, "wb")  # noqa: SIM115 (held open across the stop on purpose)
    try:
        f.write(b"x" * 1000)
        f.flush()
        mount.proc.send_signal(signal.SIGTERM)
        assert mount.proc.wait(60) == 0
    finally:
        with contextlib.suppress(OSError):  # the mount is gone: this close publishes nothing
            f.close()
    log = mount.log()
    assert "finishing 1 uploads in progress" in log
    assert "not uploaded at stop (still open or failed): Incoming/still-open.bin" in log
    assert local_minerva.keys("Incoming/") == []
    assert not os.path.ismount(mount.path)
