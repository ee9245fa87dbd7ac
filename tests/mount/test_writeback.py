"""Write-back (`--write-back`): close() returns once the file is durable on local disk; nothing
is ever lost or seen half-written, whatever happens to the daemon.

Real mounts against the local Minerva; the bucket is watched with the admin credentials, as a
pipeline would (every object listed must be whole, each name appears once).
"""

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading

import pytest
from helpers import local_minerva_with_lifetime, wait_for

SMALL = 50
BIG = 200 << 20


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minerva_mount", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "COLUMNS": "160"})


def spool_of(mount) -> str:
    return str(mount.path.parent / f"{mount.path.name}.cache" / "spool")


def journals(mount) -> list[dict]:
    folder = spool_of(mount)
    found = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name.endswith(".json"):
            try:
                with open(os.path.join(folder, name)) as f:
                    found.append(json.load(f))
            except (OSError, ValueError):
                continue  # replaced while read
    return found


class Observer:
    """Lists the bucket as a pipeline would, over and over, until stopped: every object it
    sees must have the size and bytes the file was written with."""

    def __init__(self, local, expected: dict[str, bytes]):
        self.local, self.expected = local, expected
        self.bad: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(60)

    def _run(self):
        admin = self.local.admin()
        while not self._stop.is_set():
            for page in admin.get_paginator("list_objects_v2").paginate(
                    Bucket=self.local.bucket, Prefix=self.local.prefix + "Incoming/"):
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(self.local.prefix):]
                    want = self.expected.get(key)
                    if key.endswith("/"):
                        continue  # a folder marker (mkdir)
                    if want is None or obj["Size"] != len(want):
                        self.bad.append(f"{key}: {obj['Size']} bytes")


def contents(count: int, big: bool) -> dict[str, bytes]:
    made = {f"Incoming/wb/f{i:03}.bin": os.urandom(16 << 10) for i in range(count)}
    if big:
        made["Incoming/wb/big.bin"] = os.urandom(BIG)
    return made


def write_files(mountpoint, made: dict[str, bytes]) -> dict[str, bytes]:
    for key, data in made.items():
        (mountpoint / key).write_bytes(data)
    return made


def in_bucket_whole(local, expected: dict[str, bytes]) -> bool:
    keys = [k for k in local.keys("Incoming/wb/") if not k.endswith("/")]
    if sorted(keys) != sorted(expected):
        return False
    return all(hashlib.sha256(local.get(k)).digest() == hashlib.sha256(v).digest()
               for k, v in expected.items())


@pytest.fixture
def wb_mount(wiped, mount_factory, runtime_dir):
    return lambda name="mnt", extra=(): mount_factory(extra=("--write-back", *extra), name=name)


def test_close_returns_before_the_upload_and_sync_waits_for_all(wb_mount, wiped):
    mount = wb_mount()
    folder = mount.path / "Incoming" / "wb"
    folder.mkdir()
    written = write_files(mount.path, contents(20, big=False))
    result = cli("sync", str(mount.path))
    assert result.returncode == 0, result.stderr
    assert "all files are in S3" in result.stdout
    assert in_bucket_whole(wiped, written)
    for key, data in written.items():  # and the mount reads them back
        assert (mount.path / key).read_bytes() == data


def test_spool_files_are_ours_alone(wb_mount, wiped):
    mount = wb_mount(extra=("--s3-retry-timeout", "2"))
    os.listdir(mount.path / "Incoming")  # listed (and cached) while S3 is up
    wiped.s3("down")  # nothing leaves the spool meanwhile
    try:
        (mount.path / "Incoming" / "secret.txt").write_bytes(b"payroll")
        folder = spool_of(mount)
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
        names = os.listdir(folder)
        data = [n for n in names if n.endswith(".data")]
        assert len(data) == 1, names
        journal = json.loads(os.getxattr(os.path.join(folder, data[0]), "user.minerva.journal"))
        assert journal["key"] == "Incoming/secret.txt"  # the journal rides with the data (0600)
        for name in names:
            st = os.stat(os.path.join(folder, name))
            assert stat.S_IMODE(st.st_mode) == 0o600, name
            assert st.st_uid == os.getuid()
        state = os.getxattr(mount.path / "Incoming" / "secret.txt", "user.minerva.state")
        assert state in (b"spooled", b"publishing")  # waiting, or an attempt under way
        assert (mount.path / "Incoming" / "secret.txt").read_bytes() == b"payroll"  # reads see the spool
    finally:
        wiped.s3("up")
    wait_for(lambda: wiped.keys("Incoming/") == ["Incoming/secret.txt"], "the spooled file to arrive")


def test_sigkill_with_files_spooled_loses_nothing_and_shows_nothing_partial(wb_mount, wiped):
    mount = wb_mount()
    folder = mount.path / "Incoming" / "wb"
    folder.mkdir()
    written = contents(SMALL, big=True)
    with Observer(wiped, written) as observer:
        write_files(mount.path, written)
        # Killed while the big file's multipart upload is under way (some parts journaled).
        wait_for(lambda: any(j["key"].endswith("big.bin") and j["parts"] for j in journals(mount)),
                 "a part of the big file to be journaled", timeout=120)
        mount.proc.send_signal(signal.SIGKILL)
        mount.proc.wait(30)
        subprocess.run(["fusermount3", "-u", "-z", str(mount.path)], check=False, capture_output=True)
        assert "Incoming/wb/big.bin" not in wiped.keys("Incoming/wb/")  # not completed: never seen
        again = wb_mount(name="mnt")  # same cache folder: the spool left behind
        result = cli("sync", str(again.path))
        assert result.returncode == 0, result.stdout + result.stderr
        assert in_bucket_whole(wiped, written)
    assert observer.bad == []
    assert "left by an earlier run" in again.log()
    assert journals(again) == []


def test_mkdir_is_spooled_too_and_a_sigkill_loses_no_folder(wb_mount, wiped):
    """mkdir waits for no round trip either: the folder's marker is spooled like a file."""
    mount = wb_mount(extra=("--s3-retry-timeout", "2"))
    os.listdir(mount.path / "Incoming")  # listed (and cached) while S3 is up
    wiped.s3("down")  # nothing leaves the spool meanwhile
    try:
        (mount.path / "Incoming" / "made" / "inner").mkdir(parents=True)
        assert "made" in os.listdir(mount.path / "Incoming")
        assert os.listdir(mount.path / "Incoming" / "made") == ["inner"]
        mount.proc.send_signal(signal.SIGKILL)
        mount.proc.wait(30)
        subprocess.run(["fusermount3", "-u", "-z", str(mount.path)], check=False, capture_output=True)
    finally:
        wiped.s3("up")
    assert wiped.keys("Incoming/") == []
    again = wb_mount(name="mnt")
    assert os.listdir(again.path / "Incoming" / "made") == ["inner"]  # shown from the spool
    result = cli("sync", str(again.path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert wiped.keys("Incoming/") == ["Incoming/made/", "Incoming/made/inner/"]


@pytest.fixture(scope="module")
def short_lived(tmp_path_factory):
    with local_minerva_with_lifetime(tmp_path_factory, 20) as local:
        yield local


def test_a_failure_that_cannot_succeed_stays_in_the_spool_and_sync_reports_it(
        short_lived, mount_factory, runtime_dir):
    short_lived.wipe()
    mount = mount_factory(local=short_lived, extra=("--write-back", "--credential-wait", "2"))
    incoming = mount.path / "Incoming"
    os.listdir(incoming)  # listed (and cached) while S3 is up
    short_lived.s3("down")  # the upload waits (retried) until the credentials have run out...
    try:
        (incoming / "doomed.txt").write_bytes(b"kept safe")  # close succeeds: it is on local disk
        short_lived.fault("403")  # ...and the key has lost its storage entitlement
        wait_for(lambda: os.getxattr(incoming / "doomed.txt", "user.minerva.state") == b"failed",
                 "the upload to fail for good", timeout=90)
    finally:
        short_lived.s3("up")
    try:
        result = cli("sync", str(mount.path))
        assert result.returncode == 1
        assert "failed: Incoming/doomed.txt" in result.stderr
        assert "kept in the spool" in mount.log()
        assert [j["key"] for j in journals(mount)] == ["Incoming/doomed.txt"]
    finally:
        short_lived.fault("ok")
    assert cli("unmount", str(mount.path)).returncode == 0
    again = mount_factory(local=short_lived, extra=("--write-back",))  # the next start tries again
    assert cli("sync", str(again.path)).returncode == 0
    assert short_lived.get("Incoming/doomed.txt") == b"kept safe"


def test_spool_cap_makes_close_wait_not_fail(wb_mount, wiped):
    done = threading.Event()
    errors: list[BaseException] = []
    mount = wb_mount(extra=("--spool-size", "1M", "--s3-retry-timeout", "1"))
    folder = mount.path / "Incoming"
    os.listdir(folder)  # listed (and cached) while S3 is up
    wiped.s3("down")
    try:
        (folder / "first.bin").write_bytes(os.urandom(900 << 10))  # the spool is now nearly full

        def second():
            try:
                (folder / "second.bin").write_bytes(os.urandom(900 << 10))
            except BaseException as exc:  # noqa: BLE001 (reported below)
                errors.append(exc)
            done.set()
        threading.Thread(target=second, daemon=True).start()
        wait_for(lambda: "waits for uploads to make room" in mount.log(), "the second close to wait")
        assert not done.is_set()
    finally:
        wiped.s3("up")
    wait_for(done.is_set, "the second close to return once there is room", timeout=120)
    assert errors == []
    wait_for(lambda: sorted(wiped.keys("Incoming/")) == ["Incoming/first.bin", "Incoming/second.bin"],
             "both files in S3", timeout=120)
