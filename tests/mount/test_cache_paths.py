"""A cache folder shared with other users: what another user planted there is never used.

`--cache-dir` in a 1777 folder where another user made `blocks-1048576` and `staging`
symlinks to a folder of theirs: the daemon refuses to start, naming the path, and leaves
that folder as it was (no chmod, nothing written into it).
"""

import os
import stat
import subprocess

import pytest
from helpers import start_mount, stop_process, wait_for

STRANGER = 65534  # nobody

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="planting another user's folder needs root")


@pytest.mark.parametrize("planted", [("blocks-1048576", "staging"), ("blocks-1048576",), ("staging",)],
                         ids=["both", "blocks", "staging"])
def test_planted_cache_folders_stop_the_mount(local_minerva, tmp_path, planted):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    theirs.chmod(0o755)
    os.chown(theirs, STRANGER, STRANGER)
    for name in planted:
        (shared / name).symlink_to(theirs)
        os.lchown(shared / name, STRANGER, STRANGER)

    mountpoint = tmp_path / "mnt"
    proc = start_mount(local_minerva, mountpoint, tmp_path / "mnt.log", extra=("--cache-dir", str(shared)))
    try:
        wait_for(lambda: proc.poll() is not None or os.path.ismount(mountpoint),
                 "the mount to start or exit", timeout=120)
        started = os.path.ismount(mountpoint)
    finally:
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False, capture_output=True)
        stop_process(proc)
    message = proc.stderr.read().decode(errors="replace")
    assert not started and proc.returncode != 0, "the mount started on a planted cache folder"
    assert f"{shared / planted[0]} is a symlink" in message
    assert f"{shared / planted[0]} is a symlink" in (tmp_path / "mnt.log").read_text()
    assert not os.path.ismount(mountpoint)
    info = theirs.lstat()
    assert (stat.S_IMODE(info.st_mode), info.st_uid, os.listdir(theirs)) == (0o755, STRANGER, [])
