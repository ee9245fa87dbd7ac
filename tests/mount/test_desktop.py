"""The drive used as a desktop uses it: GIO (what Nautilus runs on), ls, find, du, stat, getfattr.

Each test asserts what the user sees and the S3 requests it cost, read from the mount's
`user.minerva.requests` xattr before and after. Mounts here re-list folders in use only every
300 s, so no background refresh lands between two readings; the propagation tests set it small.
"""

import errno
import json
import os
import random
import re
import struct
import subprocess
import sys
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import wait_for

# GIO without a session bus: the local VFS and the plain unix volume monitor, as GIO would use
# them inside a desktop session, minus gvfs (which needs D-Bus).
GIO_ENV = {**os.environ, "GIO_USE_VFS": "local", "GIO_USE_VOLUME_MONITOR": "unix"}
GIO_ENV.pop("DBUS_SESSION_BUS_ADDRESS", None)
# Request counts must not pick up a background re-list, nor a listing expiring on a slow machine.
QUIET = ("--refresh-interval", "300", "--metadata-ttl", "600")


def requests(mount) -> Counter:
    return Counter(json.loads(os.getxattr(mount.path, "user.minerva.requests")))


def cost(mount, action) -> Counter:
    """The S3 requests `action()` made, by kind (zero counts dropped)."""
    before = requests(mount)
    action()
    return +(requests(mount) - before)


def run(*argv, ok=True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, env=GIO_ENV, **kwargs)
    if ok:
        assert result.returncode == 0, f"{argv}: {result.stderr}"
    return result


def put_many(local, folder: str, count: int) -> None:
    """`count` small objects under `folder`, as a pipeline would leave them (32 at a time)."""
    admin = local.admin()

    def put(i: int) -> None:
        admin.put_object(Bucket=local.bucket, Key=f"{local.prefix}{folder}/f{i:05d}.csv",
                         Body=b"x" * (i % 100))
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(put, range(count)))


def delete_all(local, folder: str) -> None:
    """Delete everything under `folder`, 1,000 keys per request (first page until none left)."""
    admin = local.admin()
    while keys := [{"Key": o["Key"]} for o in admin.list_objects_v2(
            Bucket=local.bucket, Prefix=f"{local.prefix}{folder}/").get("Contents", [])]:
        admin.delete_objects(Bucket=local.bucket, Delete={"Objects": keys, "Quiet": True})
    # SeaweedFS keeps listing the emptied folder until its marker key is deleted too.
    admin.delete_object(Bucket=local.bucket, Key=f"{local.prefix}{folder}/")


@pytest.fixture
def desktop(local_minerva, mount_factory):
    local_minerva.wipe()
    return mount_factory(extra=QUIET)


# ----- metadata cache -------------------------------------------------------------------------


def test_ls_l_of_10000_objects_costs_10_lists_cold_and_nothing_warm(desktop, local_minerva):
    put_many(local_minerva, "Outgoing/many", 10_000)
    try:
        folder = desktop.path / "Outgoing" / "many"
        # Outgoing/ (the root: at start), and beside it one page of many/, listed ahead of a
        # walk into it (listings.list_ahead) and dropped: it takes ten.
        assert cost(desktop, lambda: os.stat(folder)) == {"list": 2}

        cold = cost(desktop, lambda: run("ls", "-l", str(folder)))
        assert cold == {"list": 10}
        listed = run("ls", "-l", str(folder)).stdout.splitlines()
        assert len(listed) == 10_001 and listed[0].startswith("total ")
        assert listed[-1].split()[4:5] == ["99"] and listed[-1].endswith(" f09999.csv")

        assert cost(desktop, lambda: run("ls", "-l", str(folder))) == {}
        found = []
        assert cost(desktop, lambda: found.extend(run("find", str(folder)).stdout.split())) == {}
        assert len(found) == 10_001
        usage = []
        assert cost(desktop, lambda: usage.append(run("du", "-sb", str(folder)).stdout)) == {}
        assert usage[0].split()[0] == str(sum(i % 100 for i in range(10_000)))
        stat = []
        one = str(folder / "f00042.csv")
        assert cost(desktop, lambda: stat.append(run("stat", "-c", "%s %F", one))) == {}
        assert stat[0].stdout == "42 regular file\n"
    finally:
        delete_all(local_minerva, "Outgoing/many")


def test_absent_names_file_managers_probe_cost_no_request(desktop):
    incoming = desktop.path / "Incoming"
    os.listdir(incoming)
    probes = [".hidden", "autorun.inf", ".Trash-0", ".directory", "desktop.ini", ".DS_Store"]

    def probe_all():
        for name in probes:
            with pytest.raises(FileNotFoundError):
                os.stat(incoming / name)
    assert cost(desktop, probe_all) == {}
    assert cost(desktop, probe_all) == {}  # again: answered by the kernel's negative entries
    for name in [".Trash", ".Trash-0", ".xdg-volume-info", "autorun.inf"]:
        assert cost(desktop, lambda n=name: os.path.exists(desktop.path / n)) == {}


def test_created_file_is_found_after_a_negative_lookup(desktop, local_minerva):
    target = desktop.path / "Incoming" / "later.txt"
    assert not target.exists()
    target.write_text("now here\n")
    assert target.read_text() == "now here\n"
    assert local_minerva.get("Incoming/later.txt") == b"now here\n"


def test_copying_and_removing_many_files_lists_nothing(desktop, local_minerva, tmp_path):
    names = [f"scan{n:02d}.tiff" for n in range(20)]
    for name in names:
        (tmp_path / name).write_bytes(name.encode())
    incoming = desktop.path / "Incoming"
    os.listdir(incoming)
    sources = [str(tmp_path / name) for name in names]
    assert cost(desktop, lambda: run("cp", *sources, str(incoming))) == {"put": 20}
    listed = []
    assert cost(desktop, lambda: listed.append(run("ls", "-l", str(incoming)))) == {}
    assert [line.split()[-1] for line in listed[0].stdout.splitlines()[1:]] == names
    assert sorted(local_minerva.keys()) == [f"Incoming/{name}" for name in names]
    targets = [str(incoming / name) for name in names]
    assert cost(desktop, lambda: run("gio", "remove", *targets)) == {"delete": 20}
    assert local_minerva.keys() == [] and os.listdir(incoming) == []


# ----- file-manager probes and status attributes ---------------------------------------------------


def test_xattr_probes_answer_at_once_without_requests(desktop, local_minerva):
    local_minerva.put("Outgoing/report.pdf", b"%PDF-1.7 report")
    path = desktop.path / "Outgoing" / "report.pdf"
    os.stat(path)

    def probes():
        # Namespaces the mount has no names in answer ENOTSUP, which `ls -l` remembers for the
        # whole file system (it then stops asking per file); user.* names it lacks, ENODATA.
        for name in ("security.selinux", "system.posix_acl_access", "system.posix_acl_default",
                     "trusted.overlay.opaque"):
            with pytest.raises(OSError) as info:
                os.getxattr(path, name)
            assert info.value.errno == errno.ENOTSUP, name
        for name in ("user.xdg.origin.url", "user.minerva.nonexistent"):
            with pytest.raises(OSError) as info:
                os.getxattr(path, name)
            assert info.value.errno == errno.ENODATA, name
        with pytest.raises(OSError) as info:
            os.setxattr(path, "user.xdg.tags", b"red")
        assert info.value.errno == errno.ENOTSUP
        with pytest.raises(OSError) as info:
            os.setxattr(path, "user.minerva.state", b"cached")
        assert info.value.errno == errno.EPERM
        with pytest.raises(OSError) as info:
            os.getxattr(desktop.path / "Incoming", "user.minerva.state")
        assert info.value.errno == errno.ENODATA
        # What ls -l makes of it: no SELinux context ('.') nor ACL ('+') after the mode.
        assert run("ls", "-l", str(path)).stdout.split()[0] == "-rw-r--r--"
    assert cost(desktop, probes) == {}


def test_statfs_reports_ample_free_space(desktop):
    stats = os.statvfs(desktop.path)
    assert stats.f_bavail * stats.f_frsize >= 1 << 50
    df = run("df", "-B1", "--output=avail", str(desktop.path)).stdout.split()
    assert int(df[-1]) >= 1 << 50


def test_status_xattrs_follow_an_upload(desktop, local_minerva):
    path = desktop.path / "Incoming" / "data.csv"
    with open(path, "wb") as f:
        f.write(b"a,b\n1,2\n")
        f.flush()
        # Read in this process: a child process would close its inherited copy of the
        # descriptor, and FUSE reports that close as a flush, which publishes the file.
        assert os.getxattr(path, "user.minerva.state") == b"uploading"
        assert os.listxattr(path) == ["user.minerva.state"]
    assert os.listxattr(path) == ["user.minerva.state", "user.minerva.etag"]
    dump = run("getfattr", "-d", "-m", "user.minerva", str(path)).stdout
    etag = local_minerva.admin().head_object(
        Bucket=local_minerva.bucket, Key=local_minerva.prefix + "Incoming/data.csv")["ETag"].strip('"')
    assert 'user.minerva.state="uploaded"' in dump
    assert f'user.minerva.etag="{etag}"' in dump
    assert "user.minerva.requests" in os.listxattr(desktop.path)


# ----- GIO, as Nautilus uses it ---------------------------------------------------------------


def test_gio_copy_into_incoming_costs_one_put(desktop, local_minerva, tmp_path):
    source = tmp_path / "photo.jpg"
    data = os.urandom(3 << 20)
    source.write_bytes(data)
    os.listdir(desktop.path / "Incoming")
    done = []
    spent = cost(desktop, lambda: done.append(run(
        "gio", "copy", "--progress", str(source), str(desktop.path / "Incoming" / "photo.jpg"))))
    assert spent == {"put": 1}
    assert "Transferred" in done[0].stdout
    assert local_minerva.get("Incoming/photo.jpg") == data
    assert local_minerva.keys("Incoming/") == ["Incoming/photo.jpg"]


def test_gio_copy_out_of_outgoing_costs_one_get_and_no_head(desktop, local_minerva, tmp_path):
    data = os.urandom(300_000)
    local_minerva.put("Outgoing/export.parquet", data)
    os.listdir(desktop.path / "Outgoing")
    target = tmp_path / "export.parquet"
    spent = cost(desktop, lambda: run("gio", "copy", str(desktop.path / "Outgoing" / "export.parquet"),
                                      str(target)))
    assert target.read_bytes() == data
    # Ranged GETs only (the reader's first small read, then a read-ahead window, and GIO's
    # own sniff of the first bytes): the size and ETag come from the cached listing, no HEAD.
    assert set(spent) == {"get"} and spent["get"] <= 3, spent


def test_gio_list_and_info_read_only_what_they_sniff(desktop, local_minerva):
    for name in ("a.csv", "b.pdf", "notes.txt", "noext"):
        local_minerva.put(f"Outgoing/{name}", b"col1,col2\n1,2\n")
    outgoing = desktop.path / "Outgoing"
    assert cost(desktop, lambda: os.listdir(outgoing)) == {"list": 1}  # Outgoing/ (the root: at start)
    listed = []
    spent = cost(desktop, lambda: listed.append(run("gio", "list", "-a", "standard::*", str(outgoing))))
    names = sorted(line.split("\t")[0] for line in listed[0].stdout.splitlines())
    assert names == ["a.csv", "b.pdf", "noext", "notes.txt"]
    assert "standard::content-type=text/csv" in listed[0].stdout
    # No LIST, no HEAD; GETs only for content GIO sniffs (a name without a known extension).
    assert spent["list"] == 0 and spent["head"] == 0 and spent["get"] <= 1, spent
    info = []
    assert cost(desktop, lambda: info.append(run("gio", "info", str(outgoing / "a.csv")))) == {}
    assert "standard::size: 14" in info[0].stdout and "type: regular" in info[0].stdout


def test_gio_trash_fails_at_once_so_the_file_manager_offers_delete(desktop, local_minerva):
    local_minerva.put("Incoming/old.csv", b"1,2\n")
    target = desktop.path / "Incoming" / "old.csv"
    os.stat(target)
    result = []
    assert cost(desktop, lambda: result.append(run("gio", "trash", str(target), ok=False))) == {}
    assert result[0].returncode != 0
    assert "Unable to find or create trash directory" in result[0].stderr
    assert local_minerva.keys() == ["Incoming/old.csv"]
    assert cost(desktop, lambda: run("gio", "remove", str(target))) == {"delete": 1}
    assert local_minerva.keys() == []
    assert not target.exists()


def test_gio_move_within_incoming_is_a_server_side_copy(desktop, local_minerva):
    local_minerva.put("Incoming/draft.txt", b"text")
    incoming = desktop.path / "Incoming"
    os.listdir(incoming)
    draft, final = str(incoming / "draft.txt"), str(incoming / "final.txt")
    spent = cost(desktop, lambda: run("gio", "move", draft, final))
    assert spent["copy"] == 1 and spent["delete"] == 1 and spent["put"] == 0 and spent["get"] == 0, spent
    assert local_minerva.keys() == ["Incoming/final.txt"]
    assert local_minerva.get("Incoming/final.txt") == b"text"
    assert sorted(os.listdir(incoming)) == ["final.txt"]


# ----- changes made elsewhere -----------------------------------------------------------------


def test_exports_appear_change_and_vanish_in_an_open_folder(local_minerva, mount_factory):
    local_minerva.wipe()
    mount = mount_factory(extra=("--refresh-interval", "0.5"))
    outgoing = mount.path / "Outgoing"
    fd = os.open(outgoing, os.O_RDONLY | os.O_DIRECTORY)  # a file manager showing the folder
    try:
        assert os.listdir(outgoing) == []
        assert not (outgoing / "export.csv").exists()  # the kernel now caches "absent"
        local_minerva.put("Outgoing/export.csv", b"v1\n")
        wait_for(lambda: "export.csv" in os.listdir(outgoing), "the export to appear", timeout=30)
        assert (outgoing / "export.csv").read_bytes() == b"v1\n"

        local_minerva.put("Outgoing/export.csv", b"version 2\n")
        wait_for(lambda: os.stat(outgoing / "export.csv").st_size == 10, "the new size", timeout=30)
        assert (outgoing / "export.csv").read_bytes() == b"version 2\n"

        local_minerva.admin().delete_object(Bucket=local_minerva.bucket,
                                            Key=local_minerva.prefix + "Outgoing/export.csv")
        # The listing changes first; the kernel drops its cached name a moment later (the
        # invalidation is queued to a worker thread), so both are polled.
        wait_for(lambda: "export.csv" not in os.listdir(outgoing) and not (outgoing / "export.csv").exists(),
                 "the export to vanish from the listing and from the kernel's names", timeout=30)
    finally:
        os.close(fd)


def test_recently_listed_subfolder_is_kept_fresh(local_minerva, mount_factory):
    local_minerva.wipe()
    local_minerva.put("Outgoing/daily/2026-01-01.csv", b"1")
    try:
        mount = mount_factory(extra=("--refresh-interval", "0.5"))
        daily = mount.path / "Outgoing" / "daily"
        assert os.listdir(daily) == ["2026-01-01.csv"]
        local_minerva.put("Outgoing/daily/2026-01-02.csv", b"2")
        wait_for(lambda: os.path.exists(daily / "2026-01-02.csv"), "the new export to be visible",
                 timeout=30)
        assert sorted(os.listdir(daily)) == ["2026-01-01.csv", "2026-01-02.csv"]
    finally:
        delete_all(local_minerva, "Outgoing/daily")


# ----- what a file manager costs far away (issue 12) -------------------------------------------


def png(side: int, seed: int) -> bytes:
    """A valid RGB PNG of noise, side x side: about 3 x side^2 bytes (noise does not compress)."""
    rng = random.Random(seed)
    rows = b"".join(b"\0" + rng.randbytes(3 * side) for _ in range(side))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 1))
            + chunk(b"IEND", b""))


def test_thumbnails_of_a_folder_of_40_images_cost_one_get_each(desktop, local_minerva, tmp_path):
    # 30 kB to 1.4 MB, some over one 1 MiB block, as in a folder of photos and screenshots.
    images = {f"Outgoing/photos/img{i:02d}.png": png(100 + 15 * i, i) for i in range(40)}
    for key, data in images.items():
        local_minerva.put(key, data)
    photos = desktop.path / "Outgoing" / "photos"

    def thumbnail_all():  # what GNOME Files does for a folder shown as icons
        assert sorted(os.listdir(photos)) == sorted(key.rsplit("/", 1)[1] for key in images)
        for i, key in enumerate(images):
            out = tmp_path / f"thumb{i:02d}.png"
            run("gdk-pixbuf-thumbnailer", "-s", "128", str(desktop.path / key), str(out))
            assert out.read_bytes().startswith(b"\x89PNG")
    spent = cost(desktop, thumbnail_all)
    # One GET per image, all of it (80 before: the head read exactly, then again in its block).
    assert spent["get"] == 40 and spent["head"] == 0, spent


def test_a_move_to_trash_is_no_failure_in_the_log_or_in_status(desktop, local_minerva):
    local_minerva.put("Incoming/old.csv", b"1,2\n")
    target = desktop.path / "Incoming" / "old.csv"
    for _ in range(2):  # each "move to trash" probes again
        result = run("gio", "trash", str(target), ok=False)
        assert "Unable to find or create trash directory" in result.stderr
    probes = [line for line in desktop.log().splitlines() if "refused mkdir of .Trash" in line]
    assert len(probes) >= 2 and all(re.search(r" INFO minerva\.namespace: ", line) for line in probes), probes
    status = subprocess.run([sys.executable, "-m", "minerva_mount", "status", str(desktop.path), "--json"],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert not [f for f in json.loads(status.stdout)["recent_failures"] if ".Trash" in f["message"]]
    with pytest.raises(PermissionError):  # a real refusal is still one
        os.mkdir(desktop.path / "Reports")
    status = subprocess.run([sys.executable, "-m", "minerva_mount", "status", str(desktop.path), "--json"],
                            capture_output=True, text=True, timeout=60)
    assert [f["level"] for f in json.loads(status.stdout)["recent_failures"]
            if "refused mkdir of Reports" in f["message"]] == ["WARNING"]
