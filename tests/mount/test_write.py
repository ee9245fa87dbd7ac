"""The write path on a real mount: what a pipeline watching Incoming/ sees, and the bytes.

Every test runs an observer that lists the bucket with the admin credentials while the test
writes, and checks afterwards that it never saw a half-written, empty or temporary object.
"""

import hashlib
import os
import shutil
import subprocess
import threading

import pytest
import trio
from helpers import wait_for

from minerva_mount.credentials import CredentialProvider
from minerva_mount.store import MTIME_META, S3Store

MIB = 1 << 20


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Observer(threading.Thread):
    """Polls list_objects_v2 under Incoming/ and records every (key, size) it sees."""

    def __init__(self, local):
        super().__init__(daemon=True)
        self.local = local
        self.seen: dict[str, set[int]] = {}
        self.stopping = threading.Event()
        self.rounds = 0

    def run(self):
        client = self.local.admin()
        base = self.local.prefix + "Incoming/"
        while not self.stopping.is_set():
            for page in client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.local.bucket, Prefix=base):
                for obj in page.get("Contents", []):
                    self.seen.setdefault(obj["Key"][len(self.local.prefix):], set()).add(obj["Size"])
            self.rounds += 1

    def stop(self):
        self.stopping.set()
        self.join(30)

    def check(self, allowed: dict[str, set[int]]):
        """Only these keys, each only with these sizes, were ever visible."""
        assert self.rounds > 0
        for key, sizes in self.seen.items():
            assert key in allowed, f"observer saw {key!r} (a temporary or unexpected name)"
            assert sizes <= allowed[key], f"observer saw {key} with sizes {sizes}, allowed {allowed[key]}"


@pytest.fixture
def observer(mount, local_minerva):
    watcher = Observer(local_minerva)
    watcher.start()
    try:
        yield watcher
    finally:
        watcher.stop()


def final_state(local, expected: dict[str, bytes]):
    assert sorted(local.keys("Incoming/")) == sorted(expected)
    for key, data in expected.items():
        assert sha256(local.get(key)) == sha256(data), key


def head(local, key: str) -> dict:
    return local.admin().head_object(Bucket=local.bucket, Key=local.prefix + key)


def test_streamed_copy_arrives_once_and_whole(mount, local_minerva, observer, tmp_path):
    data = os.urandom(40 * MIB + 123)
    (tmp_path / "src.bin").write_bytes(data)
    subprocess.run(["cp", str(tmp_path / "src.bin"), str(mount.path / "Incoming" / "big.bin")], check=True)
    observer.stop()
    final_state(local_minerva, {"Incoming/big.bin": data})
    observer.check({"Incoming/big.bin": {len(data)}})


def _peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MiB."""
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def test_4_gib_copied_in_keeps_the_daemon_under_300_mib(mount, local_minerva, observer):
    """Parts in flight are bounded, so memory does not grow with the file (issue 4, 6.)."""
    size, digest = 4 << 30, hashlib.sha256()
    pattern = os.urandom(MIB + 1)  # each MiB written starts one byte further along
    with open(mount.path / "Incoming" / "4g.bin", "wb") as f:
        for i in range(size // MIB):
            start = i % (MIB + 1)
            piece = (pattern[start:] + pattern[:start])[:MIB]
            f.write(piece)
            digest.update(piece)
    assert _peak_rss_mib(mount.proc.pid) < 300
    observer.stop()
    observer.check({"Incoming/4g.bin": {size}})
    body = local_minerva.admin().get_object(Bucket=local_minerva.bucket,
                                            Key=local_minerva.prefix + "Incoming/4g.bin")["Body"]
    stored = hashlib.sha256()
    while chunk := body.read(8 * MIB):
        stored.update(chunk)
    assert stored.hexdigest() == digest.hexdigest()
    local_minerva.admin().delete_object(Bucket=local_minerva.bucket,
                                        Key=local_minerva.prefix + "Incoming/4g.bin")


def test_in_place_changes_go_up_whole_at_close(mount, local_minerva, observer):
    base = os.urandom(12 * MIB + 5)
    local_minerva.put("Incoming/data.bin", base)
    path = mount.path / "Incoming" / "data.bin"
    wait_for(lambda: path.exists(), "the object to be listed")
    with open(path, "r+b") as f:  # random writes into an existing file, read back through it
        f.seek(3 * MIB + 7)
        f.write(b"random")
        f.seek(11 * MIB)
        f.write(b"more")
        f.seek(3 * MIB)
        assert f.read(13) == base[3 * MIB:3 * MIB + 7] + b"random"
    expected = bytearray(base)
    expected[3 * MIB + 7:3 * MIB + 13] = b"random"
    expected[11 * MIB:11 * MIB + 4] = b"more"
    assert local_minerva.get("Incoming/data.bin") == bytes(expected)
    with open(path, "ab") as f:  # append
        f.write(b"appended")
    expected += b"appended"
    assert local_minerva.get("Incoming/data.bin") == bytes(expected)
    os.truncate(path, 5 * MIB)  # shrink
    assert local_minerva.get("Incoming/data.bin") == bytes(expected[:5 * MIB])
    os.truncate(path, 5 * MIB + 10)  # grow: zeros
    assert local_minerva.get("Incoming/data.bin") == bytes(expected[:5 * MIB]) + bytes(10)
    with open(path, "w+b") as f:  # O_RDWR | O_TRUNC
        f.write(b"short")
        f.seek(0)
        assert f.read() == b"short"
    observer.stop()
    final_state(local_minerva, {"Incoming/data.bin": b"short"})
    observer.check({"Incoming/data.bin": {len(base), len(expected), 5 * MIB, 5 * MIB + 10, 5}})
    assert os.stat(path).st_size == 5


def test_two_handles_on_one_file_stay_coherent(mount, local_minerva, observer):
    local_minerva.put("Incoming/shared.txt", b"0123456789")
    path = mount.path / "Incoming" / "shared.txt"
    wait_for(lambda: path.exists(), "the object to be listed")
    with open(path, "r+b", buffering=0) as a, open(path, "r+b", buffering=0) as b:
        a.write(b"AA")
        assert b.read() == b"AA23456789"
        b.write(b"BB")
        a.seek(0)
        assert a.read() == b"AA23456789BB"
    observer.stop()
    final_state(local_minerva, {"Incoming/shared.txt": b"AA23456789BB"})
    observer.check({"Incoming/shared.txt": {10, 12}})


def test_non_sequential_write_to_a_new_file(mount, local_minerva, observer):
    path = mount.path / "Incoming" / "patched.bin"
    with open(path, "wb") as f:
        f.write(b"header--body")
        f.seek(0)
        f.write(b"HEADER")
    observer.stop()
    final_state(local_minerva, {"Incoming/patched.bin": b"HEADER--body"})
    observer.check({"Incoming/patched.bin": {12}})


def test_gio_style_temporary_then_rename_makes_one_object(mount, local_minerva, observer):
    incoming = mount.path / "Incoming"
    data = os.urandom(3 * MIB)
    local_minerva.put("Incoming/doc.odt", b"old version")
    wait_for(lambda: (incoming / "doc.odt").exists(), "the old version to be listed")
    temp = incoming / ".goutputstream-ABC123"
    temp.write_bytes(data)
    assert local_minerva.keys("Incoming/") == ["Incoming/doc.odt"]
    assert temp.read_bytes() == data  # the kept-back file reads back from the mount
    os.rename(temp, incoming / "doc.odt")  # replaces the old version
    part = incoming / "report.pdf.part"  # KDE
    part.write_bytes(b"kde")
    os.rename(part, incoming / "report.pdf")
    swap = incoming / ".doc.odt.swp"  # a temporary file deleted never reaches S3
    swap.write_bytes(b"swap")
    os.unlink(swap)
    observer.stop()
    final_state(local_minerva, {"Incoming/doc.odt": data, "Incoming/report.pdf": b"kde"})
    observer.check({"Incoming/doc.odt": {len(b"old version"), len(data)}, "Incoming/report.pdf": {3}})
    assert sorted(os.listdir(incoming)) == ["doc.odt", "report.pdf"]


@pytest.mark.parametrize("tool", ["rsync", "cp-p", "copy2", "mv"])
def test_copy_tools_keep_bytes_and_mtime(mount, local_minerva, observer, tmp_path, tool):
    src = tmp_path / "src"
    src.mkdir()
    files = {"a.csv": os.urandom(100_000), "big.bin": os.urandom(10 * MIB + 1), "empty": b""}
    for n, (name, data) in enumerate(files.items()):
        (src / name).write_bytes(data)
        os.chmod(src / name, 0o640)
        os.utime(src / name, (1_600_000_000 + n, 1_600_000_000 + n))
    dst = mount.path / "Incoming" / tool  # a name per tool: SeaweedFS may keep emptied folders
    os.mkdir(dst)
    if tool == "rsync":
        subprocess.run(["rsync", "-a", f"{src}/", f"{dst}/"], check=True)
    elif tool == "cp-p":
        subprocess.run(["cp", "-p", *[str(src / n) for n in files], str(dst)], check=True)
    elif tool == "copy2":
        for name in files:
            shutil.copy2(src / name, dst / name)
    else:
        subprocess.run(["mv", *[str(src / n) for n in files], str(dst)], check=True)
    expected = {f"Incoming/{tool}/{n}": d for n, d in files.items()}
    # An empty file goes up at release, which the kernel sends just after close() returns.
    wait_for(lambda: len(local_minerva.keys("Incoming/")) == len(expected) + 1, "the empty file")
    observer.stop()
    final_state(local_minerva, {**expected, f"Incoming/{tool}/": b""})
    observer.check({**{k: {len(d)} for k, d in expected.items()}, f"Incoming/{tool}/": {0}})
    for n, name in enumerate(files):
        assert os.stat(dst / name).st_mtime == 1_600_000_000 + n, (tool, name)
        # copy2 sets the time after close, when the object is already up; a streamed file of more
        # than one part had its metadata fixed when its upload began (README, "Modification times").
        if tool == "rsync" or (tool != "copy2" and len(files[name]) < 8 * MIB):
            assert float(head(local_minerva, f"Incoming/{tool}/{name}")["Metadata"]["mtime"]) == \
                1_600_000_000 + n


def test_chmod_chown_succeed_and_are_not_kept(mount, local_minerva):
    path = mount.path / "Incoming" / "c.txt"
    path.write_bytes(b"c")
    os.chmod(path, 0o600)
    os.chown(path, os.getuid(), os.getgid())
    assert local_minerva.get("Incoming/c.txt") == b"c"


def test_rename_uploaded_file_and_folder_server_side(mount, local_minerva, observer):
    incoming = mount.path / "Incoming"
    (incoming / "one.txt").write_bytes(b"one")
    os.utime(incoming / "one.txt", (1_500_000_000, 1_500_000_000))
    (incoming / "other.txt").write_bytes(b"other")
    os.rename(incoming / "one.txt", incoming / "other.txt")  # onto an existing name
    assert (incoming / "other.txt").read_bytes() == b"one"
    os.mkdir(incoming / "d")
    for n in range(20):
        (incoming / "d" / f"f{n}").write_bytes(b"%d" % n)
    os.rename(incoming / "d", incoming / "e")
    observer.stop()
    expected = {"Incoming/other.txt": b"one", "Incoming/e/": b"",
                **{f"Incoming/e/f{n}": b"%d" % n for n in range(20)}}
    final_state(local_minerva, expected)
    assert sorted(os.listdir(incoming / "e")) == sorted(f"f{n}" for n in range(20))
    allowed = {k: {len(v)} for k, v in expected.items()}
    allowed.update({"Incoming/one.txt": {3}, "Incoming/other.txt": {3, 5}, "Incoming/d/": {0},
                    **{f"Incoming/d/f{n}": {len(b"%d" % n)} for n in range(20)}})
    observer.check(allowed)


def test_copy_above_the_single_copy_limit_uses_upload_part_copy(local_minerva):
    """The >5 GiB path, scaled down: parts of 5 MiB (S3's minimum) copied server-side."""
    local_minerva.wipe()
    data = os.urandom(12 * MIB + 3)
    local_minerva.admin().put_object(Bucket=local_minerva.bucket, Key=local_minerva.prefix + "Incoming/src",
                                     Body=data, Metadata={MTIME_META: "1234.5"})

    async def main():
        provider = CredentialProvider(local_minerva.api_url, local_minerva.info["api_key"])
        async with trio.open_nursery() as nursery:
            await nursery.start(provider.start)
            store = S3Store(provider, local_minerva.info["s3_endpoint"])
            store.copy_part_above, store.copy_part_size = 6 * MIB, 5 * MIB
            await store.copy("Incoming/src", "Incoming/dst", len(data))
            assert store.requests["upload_part_copy"] == 3 and store.requests["copy"] == 0
            nursery.cancel_scope.cancel()
    trio.run(main)
    assert sha256(local_minerva.get("Incoming/dst")) == sha256(data)
    assert head(local_minerva, "Incoming/dst")["Metadata"][MTIME_META] == "1234.5"
