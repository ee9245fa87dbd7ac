"""The daemon killed or stopped mid-upload: nothing half-published, the mount point reusable."""

import contextlib
import errno
import os
import signal
import subprocess

import pytest
from conftest import wait_for


def _size_on_mount(path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def test_sigkill_during_upload_leaves_no_object_and_the_mount_point_works_again(
        mount, mount_factory, local_minerva, tmp_path):
    source = tmp_path / "src.bin"
    source.write_bytes(os.urandom(120 << 20))
    target = mount.path / "Incoming" / "killed.bin"
    copy = subprocess.Popen(["cp", str(source), str(target)], stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _size_on_mount(target) > (32 << 20), "the upload to be under way")
        mount.proc.send_signal(signal.SIGKILL)
        mount.proc.wait(30)
        assert copy.wait(60) != 0  # the application sees its copy fail, not succeed silently
    finally:
        if copy.poll() is None:
            copy.kill()
    with pytest.raises(OSError) as dead:
        os.stat(mount.path)
    assert dead.value.errno == errno.ENOTCONN
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
