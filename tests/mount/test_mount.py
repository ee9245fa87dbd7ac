"""End-to-end: a real FUSE mount of the local Minerva, used with ordinary tools and syscalls."""

import errno
import hashlib
import os
import signal
import subprocess
import sys

import pytest
from helpers import wait_for

from minerva_mount.local.procs import process_gone


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_root_shows_incoming_and_outgoing_on_an_empty_area(mount, local_minerva):
    assert local_minerva.keys() == []
    assert sorted(os.listdir(mount.path)) == ["Incoming", "Outgoing"]
    assert os.path.isdir(mount.path / "Incoming") and os.path.isdir(mount.path / "Outgoing")


def test_cp_of_100_mib_arrives_whole_and_reads_back_equal(mount, local_minerva, tmp_path):
    source = tmp_path / "big.bin"
    data = os.urandom(100 << 20)
    source.write_bytes(data)
    subprocess.run(["cp", str(source), str(mount.path / "Incoming" / "big.bin")], check=True)
    assert local_minerva.keys("Incoming/") == ["Incoming/big.bin"]
    assert sha256(local_minerva.get("Incoming/big.bin")) == sha256(data)
    assert os.stat(mount.path / "Incoming" / "big.bin").st_size == len(data)
    assert sha256((mount.path / "Incoming" / "big.bin").read_bytes()) == sha256(data)


def test_dd_and_python_writes_arrive_whole(mount, local_minerva):
    target = mount.path / "Incoming" / "dd.bin"
    subprocess.run(["dd", "if=/dev/urandom", f"of={target}", "bs=1M", "count=20", "status=none"],
                   check=True)
    assert local_minerva.get("Incoming/dd.bin") == target.read_bytes()
    assert len(local_minerva.get("Incoming/dd.bin")) == 20 << 20
    (mount.path / "Incoming" / "note.txt").write_text("hello, pipeline\n")
    assert local_minerva.get("Incoming/note.txt") == b"hello, pipeline\n"


def test_object_appears_only_when_the_file_is_closed(mount, local_minerva):
    with open(mount.path / "Incoming" / "slow.csv", "wb") as f:
        f.write(os.urandom(9 << 20))  # more than one part has gone up by now
        f.flush()
        assert local_minerva.keys("Incoming/") == []
        f.write(b"tail")
    assert local_minerva.keys("Incoming/") == ["Incoming/slow.csv"]
    assert local_minerva.get("Incoming/slow.csv").endswith(b"tail")


def test_empty_file_appears_once_closed(mount, local_minerva):
    (mount.path / "Incoming" / "empty").touch()
    # Published at release, which the kernel sends just after close() returns.
    wait_for(lambda: local_minerva.keys("Incoming/") == ["Incoming/empty"], "the empty object")
    assert local_minerva.get("Incoming/empty") == b""


def test_object_put_in_outgoing_appears_with_size_and_bytes(mount, local_minerva):
    data = os.urandom(3 << 20)
    local_minerva.put("Outgoing/export.parquet", data)
    path = mount.path / "Outgoing" / "export.parquet"
    wait_for(lambda: "export.parquet" in os.listdir(mount.path / "Outgoing"), "the export to be listed")
    assert os.stat(path).st_size == len(data)
    assert path.read_bytes() == data
    with open(path, "rb") as f:
        f.seek(1_000_000)
        assert f.read(70_000) == data[1_000_000:1_070_000]


def test_writes_outside_incoming_are_refused_and_leave_nothing(mount, local_minerva, tmp_path):
    source = tmp_path / "x.txt"
    source.write_text("x")
    result = subprocess.run(["cp", str(source), str(mount.path / "Outgoing" / "x.txt")],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "Permission denied" in result.stderr
    for target in (mount.path / "Outgoing" / "y.txt", mount.path / "y.txt"):
        with pytest.raises(PermissionError):
            target.write_bytes(b"y")
    with pytest.raises(PermissionError):
        os.mkdir(mount.path / "NewTop")
    assert local_minerva.keys() == []
    assert "refused" in mount.log()


def test_mkdir_rmdir_unlink_in_both_folders(mount, local_minerva):
    for top in ("Incoming", "Outgoing"):
        folder = mount.path / top / "batch"
        os.mkdir(folder)
        assert f"{top}/batch/" in local_minerva.keys(top + "/")
        assert os.listdir(folder) == []
        local_minerva.put(f"{top}/batch/f.txt", b"f")
        wait_for(lambda f=folder: os.listdir(f) == ["f.txt"], "the new object to be listed")
        with pytest.raises(OSError) as info:
            os.rmdir(folder)
        assert info.value.errno == errno.ENOTEMPTY
        os.unlink(folder / "f.txt")
        os.rmdir(folder)
        assert local_minerva.keys(top + "/") == []
    with pytest.raises(PermissionError):
        os.rmdir(mount.path / "Outgoing")


def test_rename_inside_incoming(mount, local_minerva):
    (mount.path / "Incoming" / "a.txt").write_bytes(b"A")
    os.rename(mount.path / "Incoming" / "a.txt", mount.path / "Incoming" / "b.txt")
    assert local_minerva.keys("Incoming/") == ["Incoming/b.txt"]
    assert (mount.path / "Incoming" / "b.txt").read_bytes() == b"A"


def test_a_second_orgs_objects_never_appear(local_minerva, mount_factory):
    local_minerva.wipe()
    acme_prefix = local_minerva.prefix
    globex = next(o for o in local_minerva.info["orgs"] if o["prefix"] != acme_prefix)
    admin = local_minerva.admin()
    admin.put_object(Bucket=local_minerva.bucket, Key=globex["prefix"] + "Outgoing/secret.csv", Body=b"s")
    acme = mount_factory(name="acme")
    assert os.listdir(acme.path / "Outgoing") == []
    assert not os.path.exists(acme.path / "Outgoing" / "secret.csv")
    other = mount_factory(key=globex["api_key"], name="globex")
    assert os.listdir(other.path / "Outgoing") == ["secret.csv"]
    (acme.path / "Incoming" / "mine.txt").write_bytes(b"m")
    assert os.listdir(other.path / "Incoming") == []


@pytest.mark.parametrize("which", ["wrong", "forbidden"])
def test_bad_api_key_ends_the_mount_with_the_message(local_minerva, tmp_path, which):
    key = {"wrong": "mk_not_a_key", "forbidden": local_minerva.info["forbidden_api_key"]}[which]
    expected = {"wrong": "API key was refused (401", "forbidden": "not entitled to Minerva storage (403"}
    (tmp_path / "m").mkdir()
    env = {**os.environ, "MINERVA_API_KEY": key}
    result = subprocess.run(
        [sys.executable, "-m", "minerva_mount", str(tmp_path / "m"), "--api-url", local_minerva.api_url,
         "--s3-endpoint-url", local_minerva.info["s3_endpoint"], "--log-file", str(tmp_path / "log")],
        capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 1
    assert expected[which] in result.stderr
    assert key not in result.stderr and key not in (tmp_path / "log").read_text()
    assert not os.path.ismount(tmp_path / "m")


def test_background_mode_returns_once_live_and_fusermount_unmounts(local_minerva, tmp_path):
    mountpoint = tmp_path / "bg"
    mountpoint.mkdir()
    key_file = local_minerva.key_file(local_minerva.info["api_key"], "bg")
    result = subprocess.run(
        [sys.executable, "-m", "minerva_mount", str(mountpoint), "--api-url", local_minerva.api_url,
         "--api-key-file", str(key_file), "--s3-endpoint-url", local_minerva.info["s3_endpoint"],
         "--log-file", str(tmp_path / "bg.log")], capture_output=True, text=True, timeout=60)
    try:
        assert result.returncode == 0, result.stderr
        assert os.path.ismount(mountpoint)
        assert "Incoming" in os.listdir(mountpoint)
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False)
    pid = int(result.stdout.split("pid ")[1].split(",")[0])
    wait_for(lambda: process_gone(pid), "the daemon to exit")


def test_key_file_readable_by_others_is_refused(local_minerva, tmp_path):
    key_file = tmp_path / "loose-key"
    key_file.write_text(local_minerva.info["api_key"])
    key_file.chmod(0o644)
    (tmp_path / "m").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "minerva_mount", str(tmp_path / "m"), "--api-key-file", str(key_file)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "chmod 600" in result.stderr


def test_sigterm_finishes_the_upload_in_flight_then_unmounts(mount, local_minerva, tmp_path):
    data = os.urandom(40 << 20)
    (tmp_path / "src.bin").write_bytes(data)
    copy = subprocess.Popen(["cp", str(tmp_path / "src.bin"), str(mount.path / "Incoming" / "t.bin")])
    wait_for(lambda: "uploaded" in mount.log() or _upload_started(mount), "the copy to start")
    mount.proc.send_signal(signal.SIGTERM)
    assert copy.wait(60) == 0
    assert mount.proc.wait(60) == 0
    assert not os.path.ismount(mount.path)
    assert local_minerva.get("Incoming/t.bin") == data


def _upload_started(mount) -> bool:
    try:
        return os.stat(mount.path / "Incoming" / "t.bin").st_size > 0
    except OSError:
        return False


def test_a_childs_close_of_an_inherited_descriptor_publishes_nothing(mount, local_minerva):
    target = mount.path / "Incoming" / "report.csv"
    with open(target, "wb") as f:
        f.write(b"header\n")
        f.flush()
        subprocess.run(["/bin/true"], stdout=f, check=True)  # the child closes its copy at exit
        assert local_minerva.keys("Incoming/") == []
        f.write(b"footer\n")
    assert local_minerva.get("Incoming/report.csv") == b"header\nfooter\n"


def test_shell_script_with_a_command_between_writes(mount, local_minerva):
    for name, redirect in (("new.txt", ">"), ("new.txt", ">>")):  # streamed, then staged append
        subprocess.run(["bash", "-c", f"{{ echo a; /bin/true; echo b; }} {redirect} Incoming/{name}"],
                       cwd=mount.path, check=True)
    assert local_minerva.get("Incoming/new.txt") == b"a\nb\na\nb\n"
    assert local_minerva.keys("Incoming/") == ["Incoming/new.txt"]
