"""Secrets stay out of argv, environments and logs; the mount is its user's alone."""

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import MOUNT_LOGS, wait_for

from minerva_mount.local.procs import process_gone


@pytest.fixture
def open_dir():
    """A folder every user may traverse (pytest's tmp dirs are 0700, hiding any mount in them)."""
    path = Path(tempfile.mkdtemp(prefix="minerva-sec-"))
    path.chmod(0o755)
    yield path
    subprocess.run(["fusermount3", "-u", "-z", str(path / "m")], check=False, capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


def _daemon_pid(stdout: str) -> int:
    return int(stdout.split("pid ")[1].split(",")[0])


def _start_background(local, mountpoint: Path, log_file: Path | None, *extra: str,
                      env: dict | None = None) -> int:
    """Start as a user does (no --foreground), the key in MINERVA_API_KEY; the daemon's pid."""
    mountpoint.mkdir()
    env = dict(env or os.environ, MINERVA_API_KEY=local.info["api_key"])
    log_args = ["--log-file", str(log_file)] if log_file else []
    result = subprocess.run(
        [sys.executable, "-m", "minerva_mount", str(mountpoint), "--api-url", local.api_url,
         "--s3-endpoint-url", local.info["s3_endpoint"], *log_args, *extra],
        env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    MOUNT_LOGS.append(log_file or Path(result.stdout.split("log ")[1].rstrip().rstrip(")")))
    return _daemon_pid(result.stdout)


def _stop(mountpoint: Path, pid: int) -> None:
    subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False, capture_output=True)
    wait_for(lambda: process_gone(pid), "the daemon to exit")


def test_key_never_in_argv_environment_or_log_of_the_daemon(local_minerva, open_dir):
    key = local_minerva.info["api_key"].encode()
    mountpoint = open_dir / "m"
    state = open_dir / "state"  # the default log place: $XDG_STATE_HOME/minerva-mount/
    log_file = state / "minerva-mount" / "minerva-mount.log"
    pid = _start_background(local_minerva, mountpoint, None, env=dict(os.environ, XDG_STATE_HOME=str(state)))
    try:
        (mountpoint / "Incoming" / "s.txt").write_bytes(b"secret-free")
        assert os.listdir(mountpoint / "Incoming")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert b"minerva_mount" in cmdline  # the daemon itself, not the launcher
        assert key not in cmdline
        assert key not in environ and b"MINERVA_API_KEY" not in environ
    finally:
        _stop(mountpoint, pid)
    assert key not in log_file.read_bytes() and b"mounted" in log_file.read_bytes()
    assert stat.S_IMODE(os.stat(log_file).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(log_file.parent).st_mode) == 0o700


def test_other_users_cannot_see_the_mount_unless_allow_other(local_minerva, open_dir):
    mountpoint = open_dir / "m"
    pid = _start_background(local_minerva, mountpoint, open_dir / "m.log")
    try:
        other = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                                "ls", str(mountpoint)], capture_output=True, text=True)
        assert other.returncode != 0 and "Permission denied" in other.stderr
        assert sorted(os.listdir(mountpoint)) == ["Incoming", "Outgoing"]  # its owner sees it
    finally:
        _stop(mountpoint, pid)
    mountpoint.rmdir()

    pid = _start_background(local_minerva, mountpoint, open_dir / "m2.log", "--allow-other")
    try:
        other = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                                "ls", str(mountpoint)], capture_output=True, text=True)
        assert other.returncode == 0, other.stderr
        assert other.stdout.split() == ["Incoming", "Outgoing"]
    finally:
        _stop(mountpoint, pid)
