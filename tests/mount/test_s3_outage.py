"""S3 down during a large copy in and a large read: both finish once it is back, bytes equal.

The outage is real: the local Minerva stops its S3 server (weed) and starts it again on the
same ports (`POST /_local/s3`). That is what clients see when S3 is unreachable: new
connections refused, open ones cut, and every request must be sent again. (Freezing weed with
SIGSTOP would only stall connections, which resume by themselves when it continues: no retry
would be exercised.)
"""

import errno
import hashlib
import os
import subprocess
import time

import pytest
from helpers import wait_for

OUTAGE = 15.0  # seconds S3 stays down; the outage's length, not a synchronisation
BIG = 500 << 20


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _object_sha256(local, key: str) -> str:
    digest = hashlib.sha256()
    body = local.admin().get_object(Bucket=local.bucket, Key=local.prefix + key)["Body"]
    while chunk := body.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def _outage(local, mount, seconds: float) -> None:
    """S3 down for `seconds`, after checking the mount noticed it; back up before returning."""
    local.s3("down")
    try:
        wait_for(lambda: "retrying for up to" in mount.log(), "the mount to notice S3 is down")
        time.sleep(seconds)
    finally:
        local.s3("up")


@pytest.fixture
def big_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "big.bin"
    with open(path, "wb") as f:
        for _ in range(BIG >> 20):
            f.write(os.urandom(1 << 20))
    yield path
    path.unlink()


def test_copy_in_of_500_mib_survives_15_s_of_s3_down(mount, local_minerva, big_file):
    target = mount.path / "Incoming" / "big.bin"
    copy = subprocess.Popen(["cp", str(big_file), str(target)])
    try:
        wait_for(lambda: target.exists() and target.stat().st_size > (64 << 20), "the copy to be under way")
        _outage(local_minerva, mount, OUTAGE)
        assert copy.wait(300) == 0
    finally:
        if copy.poll() is None:
            copy.kill()
    assert _object_sha256(local_minerva, "Incoming/big.bin") == _sha256(big_file)
    assert "giving up" not in mount.log()


def test_read_of_500_mib_survives_15_s_of_s3_down(mount, local_minerva, big_file, tmp_path):
    local_minerva.admin().upload_file(str(big_file), local_minerva.bucket,
                                      local_minerva.prefix + "Outgoing/export.bin")
    copy_out = tmp_path / "out.bin"
    copy = subprocess.Popen(["cp", str(mount.path / "Outgoing" / "export.bin"), str(copy_out)])
    try:
        wait_for(lambda: copy_out.exists() and copy_out.stat().st_size > (64 << 20),
                 "the read to be under way")
        _outage(local_minerva, mount, OUTAGE)
        assert copy.wait(300) == 0
    finally:
        if copy.poll() is None:
            copy.kill()
    assert _sha256(copy_out) == _sha256(big_file)


def test_s3_down_longer_than_the_bound_fails_with_eio_and_publishes_nothing(mount_factory, local_minerva):
    local_minerva.wipe()
    mount = mount_factory(extra=("--s3-retry-timeout", "5"))
    target = mount.path / "Incoming" / "cut.bin"
    f = open(target, "wb")  # noqa: SIM115 (closed by hand: its close is what fails)
    try:
        f.write(os.urandom(20 << 20))  # two parts sent while S3 is up: the upload exists
        local_minerva.s3("down")
        with pytest.raises(OSError) as failure:
            f.write(os.urandom(20 << 20))
            f.close()
        assert failure.value.errno == errno.EIO
    finally:
        local_minerva.s3("up")
        if not f.closed:
            try:
                f.close()
            except OSError as exc:
                assert exc.errno == errno.EIO
    assert local_minerva.keys("Incoming/") == []
    assert "giving up after" in mount.log() and "--s3-retry-timeout" in mount.log()
    # The mount recovered by itself: the same name can be written now.
    target.write_bytes(b"second try")
    assert local_minerva.get("Incoming/cut.bin") == b"second try"
