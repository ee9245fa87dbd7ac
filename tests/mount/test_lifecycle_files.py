"""Issue 11, a file's life through the write path, on a real mount (cases 1-6, 10, 14, 15).

Each test does what a user does (the shell's `>>`, `: >`, `exec 3<>`, touch, mv, rm, dd,
fallocate, vim, Python's os and open) and asserts what the user relies on: the bytes and keys
in S3 as a pipeline with admin access sees them, the listing, the exit status and errno. The
racy cases loop enough to fail reliably on the code that had the race (0c1f342).

Where a file is published just after close returns (the kernel's RELEASE), or where the check
is that something does NOT come back, the test waits for the mount to say no upload is in
flight (`minerva-mount status --json`), then unmounts (which drains every upload) and looks
at S3 again: nothing is left in flight that could still change the answer.
"""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import wait_for

MIB = 1 << 20


# ----- helpers (candidates for tests/helpers.py; test_lifecycle_names.py has the same) --------

def run(*argv, cwd=None, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, cwd=cwd,
                          input=stdin, timeout=120)


def sh(script: str, *args) -> subprocess.CompletedProcess:
    """`script` run by bash, with `args` as $1, $2... (paths never pasted into the script)."""
    return run("bash", "-c", script, "bash", *args)


def status_json(mount) -> dict:
    result = subprocess.run([sys.executable, "-m", "minerva_mount", "status", str(mount.path), "--json"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


RESTING = {"kept-back", "failed"}  # held files that no upload is under way for


def settled(mount) -> dict:
    """Wait until the mount reports no upload in flight (an empty file is published at release,
    just after close returns). Kept-back and failed files stay listed in `status`, with nothing
    under way: they count as settled."""
    def done():
        report = status_json(mount)
        return all(u.get("state") in RESTING for u in report["uploads"]) and report
    return wait_for(done, "no upload in flight", timeout=30)


def eventually_equal(get, expected, what: str, timeout: float = 10.0):
    """Poll `get()` until it equals `expected`; on timeout fail showing the last value."""
    last = []

    def same():
        last[:] = [get()]
        return last[0] == expected
    try:
        wait_for(same, what, timeout=timeout)
    except TimeoutError:
        raise AssertionError(f"{what}: still {last[0]!r} after {timeout:.0f} s, expected {expected!r}") \
            from None


def logged_errors_about(mount, name: str) -> list[str]:
    return [line for line in mount.log().splitlines()
            if name in line and (" ERROR " in line or " WARNING " in line)]


# ----- case 1: the staging disk fills while a file is changed in place ----------------------------

@pytest.fixture
def small_cache_dir(tmp_path):
    """A 20 MiB tmpfs for --cache-dir. Request it BEFORE mount_factory: fixtures are torn down
    in reverse, so the mount is gone before the tmpfs is unmounted."""
    where = tmp_path / "small-cache"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m,mode=0700", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=False)


def _append_with_echo(path: Path) -> str | None:
    result = sh('echo line >> "$1"', path)
    return result.stderr.strip() if result.returncode else None


def _append_with_dd(path: Path) -> str | None:
    result = run("dd", f"of={path}", "oflag=append", "conv=notrunc", "status=none", stdin="line\n")
    return result.stderr.strip() if result.returncode else None


def _pwrite_head(path: Path) -> str | None:
    """os.pwrite on an O_RDWR open, then close: the error of the first that fails, else None."""
    fd = os.open(path, os.O_RDWR)
    error = None
    try:
        assert os.pwrite(fd, b"HEAD", 0) == 4
    except OSError as exc:
        error = exc
    try:
        os.close(fd)
    except OSError as exc:
        error = error or exc
    if error is not None:
        assert error.errno in (errno.ENOSPC, errno.EIO), error
        return error.strerror
    return None


def _how_different(stored: bytes, changed: bytes) -> str:
    if len(stored) != len(changed):
        return f"the object is neither the old version nor the changed one: {len(stored)} bytes"
    first = next(i for i in range(0, len(changed), 4096) if stored[i:i + 4096] != changed[i:i + 4096])
    zeros = len(stored[first:]) - len(stored[first:].lstrip(bytes(1)))
    return (f"the object is neither the old version nor the changed one: from byte {first} "
            f"({first / MIB:.2f} MiB) on it differs from the change, and {zeros / MIB:.2f} MiB of "
            "zeros start there")


@pytest.mark.parametrize("how", ["echo-append", "dd-append", "pwrite"])
def test_1_staging_disk_full_fails_or_uploads_whole_never_zeros(small_cache_dir, wiped, mount_factory,
                                                                  how):
    """A 30 MiB object changed in place with the staging disk (20 MiB, the block cache in it up to
    10 MiB) too small for a local copy: on 0c1f342 close returned 0 and the object kept its length
    with bytes 20-30 MiB zeros (a short os.pwrite into the full staging file was taken as done)."""
    old = os.urandom(30 * MIB)
    wiped.put("Incoming/big.bin", old)
    mount = mount_factory(extra=("--cache-dir", str(small_cache_dir / "cache"), "--cache-size", "10M"))
    path = mount.path / "Incoming" / "big.bin"
    assert os.stat(path).st_size == len(old)

    if how == "pwrite":
        error, changed = _pwrite_head(path), b"HEAD" + old[4:]
    else:
        error = (_append_with_echo if how == "echo-append" else _append_with_dd)(path)
        changed = old + b"line\n"

    stored = wiped.get("Incoming/big.bin")
    if stored != changed:
        assert stored == old, _how_different(stored, changed)
        # The change was refused: the program must have been told, and the log names the file.
        if how == "echo-append":  # bash does not check close(); the log still must say so
            assert logged_errors_about(mount, "Incoming/big.bin"), "nothing logged about big.bin"
        else:
            assert error is not None, "the change was not uploaded, yet every call succeeded"
            assert "No space left on device" in error or "Input/output error" in error, error
    else:
        assert error is None, f"the change was uploaded, yet the program got: {error}"
    # The mount keeps working once the change is over (the staging space was given back).
    (mount.path / "Incoming" / "after.txt").write_bytes(b"after")
    assert wiped.get("Incoming/after.txt") == b"after"


# ----- case 2: a process reading a file opens it again for writing ----------------------------------

def test_2_close_with_a_read_descriptor_still_open_fails_with_eio_when_s3_is_down(wiped, mount_factory):
    """`r=open(p,'rb'); w=open(p,'wb'); w.write(...); w.close()`: on 0c1f342 the close was taken
    for a forked child's (the process still had `r` on the path), returned 0 at once, and the
    upload ran at release, where a failure can only be logged."""
    wiped.put("Incoming/c2.txt", b"old version")
    mount = mount_factory(extra=("--s3-retry-timeout", "3"))
    path = mount.path / "Incoming" / "c2.txt"
    with open(path, "rb") as reader:
        assert reader.read() == b"old version"
        wiped.s3("down")
        try:
            with pytest.raises(OSError) as failure:  # open, write or close may fail
                writer = open(path, "wb")  # noqa: SIM115 (its close is what is tested)
                writer.write(b"new version")
                writer.close()
        finally:
            wiped.s3("up")
    assert failure.value.errno == errno.EIO, failure.value
    assert wiped.get("Incoming/c2.txt") == b"old version"
    assert logged_errors_about(mount, "Incoming/c2.txt"), "the failed upload is not logged"
    assert mount.unmount() == 0
    assert wiped.get("Incoming/c2.txt") == b"old version", "the failed write was published later"


def test_2_close_with_a_read_descriptor_still_open_returns_once_the_object_is_complete(wiped, mount):
    """The same with S3 up: on 0c1f342 close returned before the upload (a multipart one here,
    finished at release) and the object was not there yet."""
    incoming = mount.path / "Incoming"
    for n in range(3):
        path, first, second = incoming / f"r{n}.bin", os.urandom(MIB), os.urandom(20 * MIB)
        path.write_bytes(first)
        with open(path, "rb") as reader:
            assert reader.read(16) == first[:16]
            with open(path, "wb") as writer:
                writer.write(second)
            stored = wiped.get(f"Incoming/r{n}.bin")
            assert stored == second, f"close returned with {len(stored)} bytes of the old version in S3"
            # (what the reader reads now is case 10's business: old bytes or EIO)


# ----- case 3: an empty file renamed right after it was made ---------------------------------------

@pytest.mark.parametrize("make", [": >", "touch"])
def test_3_empty_file_renamed_at_once_is_published_under_the_new_name(runtime_dir, wiped, mount_factory,
                                                                       make):
    """`: > f && mv f g` (or touch): on 0c1f342 mv returned 0, yet S3 and the mount held f, not g."""
    mount = mount_factory()
    folder = mount.path / "Incoming" / "d3"
    os.mkdir(folder)
    made = sh(f'for i in $(seq 10); do {make} "$1/f$i" && mv "$1/f$i" "$1/g$i" || exit 1; done', folder)
    assert made.returncode == 0, made.stderr
    expected = sorted(f"g{i}" for i in range(1, 11))
    settled(mount)
    listed = sorted(os.listdir(folder))
    assert listed == expected, f"the mount lists {listed} after mv f g"
    eventually_equal(lambda: sorted(k.rsplit("/", 1)[1] for k in wiped.keys("Incoming/d3/") if k[-1] != "/"),
                     expected, "the files in S3")
    assert mount.unmount() == 0
    assert sorted(wiped.keys("Incoming/d3/")) == ["Incoming/d3/"] + [f"Incoming/d3/{n}" for n in expected]
    assert {wiped.get(f"Incoming/d3/{n}") for n in expected} == {b""}


# ----- case 4 and 5: deleted files stay deleted --------------------------------------------------------

def _assert_all_gone(mount, local, folder: Path, prefix: str) -> None:
    settled(mount)
    listed, kept = sorted(os.listdir(folder)), [k for k in local.keys(prefix) if k != prefix]
    assert (listed, kept) == ([], []), f"deleted files came back: listed {listed}, in S3 {kept}"
    assert mount.unmount() == 0
    kept = [k for k in local.keys(prefix) if k != prefix]
    assert kept == [], f"deleted files came back in S3 by the end: {kept}"


def test_4_vim_swap_probe_then_rm_stays_deleted(runtime_dir, wiped, mount_factory):
    """`exec 3<>f; exec 3>&-; rm f` (how vim probes for a swap file), 50 times: on 0c1f342 every
    rm succeeded and 1-5 of 20 files came back in S3 and in the listing (the empty file's upload
    at release raced the delete)."""
    mount = mount_factory()
    folder = mount.path / "Incoming" / "d4"
    os.mkdir(folder)
    probed = sh('for i in $(seq 50); do exec 3<>"$1/s$i"; exec 3>&-; rm "$1/s$i" || exit 1; done', folder)
    assert probed.returncode == 0, probed.stderr
    _assert_all_gone(mount, wiped, folder, "Incoming/d4/")


def test_5_touch_then_rm_succeeds_and_stays_deleted(runtime_dir, wiped, mount_factory):
    """`touch x; rm x`: on 0c1f342 rm said 'Device or resource busy' (most times with absolute
    paths) and the object stayed."""
    mount = mount_factory()
    folder = mount.path / "Incoming" / "d5"
    os.mkdir(folder)
    failed = []
    for n in range(10):
        target = folder / f"x{n}"
        assert run("touch", target).returncode == 0
        removed = run("rm", target)
        if removed.returncode != 0:
            failed.append(removed.stderr.strip())
    assert failed == [], f"{len(failed)} of 10 rm failed, first: {failed[0]}"
    _assert_all_gone(mount, wiped, folder, "Incoming/d5/")


# ----- case 6: an empty file made read-write, then renamed ----------------------------------------

def test_6_empty_file_created_read_write_then_renamed(runtime_dir, wiped, mount_factory):
    """os.open(O_CREAT|O_RDWR), close, rename: EBUSY every time on 0c1f342."""
    mount = mount_factory()
    folder = mount.path / "Incoming" / "d6"
    os.mkdir(folder)
    failed = []
    for n in range(10):
        os.close(os.open(folder / f"new{n}", os.O_CREAT | os.O_RDWR, 0o644))
        try:
            os.rename(folder / f"new{n}", folder / f"done{n}")
        except OSError as exc:
            failed.append(exc)
    assert failed == [], f"{len(failed)} of 10 renames failed, first: {failed[0]!r}"
    expected = sorted(f"done{n}" for n in range(10))
    settled(mount)
    listed = sorted(os.listdir(folder))
    assert listed == expected, f"the mount lists {listed}"
    eventually_equal(lambda: sorted(k.rsplit("/", 1)[1] for k in wiped.keys("Incoming/d6/") if k[-1] != "/"),
                     expected, "the files in S3")
    assert mount.unmount() == 0
    assert sorted(wiped.keys("Incoming/d6/")) == ["Incoming/d6/"] + [f"Incoming/d6/{n}" for n in expected]
    assert {wiped.get(f"Incoming/d6/{n}") for n in expected} == {b""}


# ----- case 10: a reader while the file is overwritten through the mount --------------------------

WRITER = """
import sys
data = open(sys.argv[2], "rb").read()
f = open(sys.argv[1], "wb")
f.write(data)
print("written", flush=True)
sys.stdin.readline()
f.close()
print("closed", flush=True)
"""


def _versions(got: bytes, old: bytes, new: bytes) -> str:
    """What the reader got, MiB by MiB: e.g. '1 MiB old, 19 MiB new'."""
    runs: list[list] = []
    for i in range(0, len(got), MIB):
        piece = got[i:i + MIB]
        kind = "old" if piece == old[i:i + MIB] else "new" if piece == new[i:i + MIB] else "other"
        if runs and runs[-1][1] == kind:
            runs[-1][0] += len(piece)
        else:
            runs.append([len(piece), kind])
    return ", ".join(f"{size / MIB:g} MiB {kind}" for size, kind in runs) or "nothing"


@pytest.mark.parametrize("writer", ["same-process-closed", "other-process-still-open"])
def test_10_reader_never_gets_old_and_new_bytes_mixed(wiped, mount_factory, tmp_path, writer):
    """Read 1 MiB of 20, overwrite the file through the mount, read on: on 0c1f342 the reader got
    1 MiB old then 19 MiB new (served from the kernel's page cache the writer had filled; no read
    reached the daemon to be checked against the ETag). Either the whole old version or EIO."""
    old, new = os.urandom(20 * MIB), os.urandom(20 * MIB)
    wiped.put("Incoming/big.bin", old)
    mount = mount_factory()
    path = mount.path / "Incoming" / "big.bin"
    source = tmp_path / "new.bin"
    source.write_bytes(new)
    holder = None
    error = None
    with open(path, "rb", buffering=0) as reader:
        got = bytearray(reader.read(MIB))
        assert got == old[:MIB]
        if writer == "same-process-closed":
            with open(path, "wb") as w:
                w.write(new)
        else:
            holder = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(source)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert holder.stdout.readline().strip() == "written"
        try:
            while chunk := reader.read(MIB):
                got += chunk
        except OSError as exc:
            error = exc
        finally:
            if holder is not None:
                holder.stdin.write("\n")
                holder.stdin.flush()
                assert holder.stdout.readline().strip() == "closed"
                assert holder.wait(60) == 0
    assert bytes(got) == old[:len(got)], f"the reader got {_versions(bytes(got), old, new)}"
    if error is None:
        assert len(got) == len(old), f"the reader got {len(got)} bytes of {len(old)} and no error"
    else:
        assert error.errno == errno.EIO, error
    assert wiped.get("Incoming/big.bin") == new


# ----- case 14: fallocate on a new name ------------------------------------------------------------

def test_14_failed_fallocate_on_a_new_name_publishes_nothing(runtime_dir, wiped, mount_factory):
    """`fallocate -l 1M fa`: on 0c1f342 EOPNOTSUPP, yet an empty object was published at release."""
    mount = mount_factory()
    folder = mount.path / "Incoming" / "d14"
    os.mkdir(folder)
    names = [f"fa{n}" for n in range(5)]
    results = {name: run("fallocate", "-l", "1M", folder / name) for name in names}
    settled(mount)
    assert mount.unmount() == 0
    for name, result in results.items():
        key = f"Incoming/d14/{name}"
        if result.returncode == 0:  # supported after all: then it must be what it says
            assert wiped.get(key) == bytes(MIB), f"{name}: fallocate succeeded, S3 does not agree"
        else:
            assert "Operation not supported" in result.stderr, result.stderr
            assert key not in wiped.keys("Incoming/d14/"), f"{name}: fallocate failed, yet it was published"


# ----- case 15: two scripted vim edits in a row ---------------------------------------------------

def _vim() -> str:
    found = shutil.which("vim") or shutil.which("vim.tiny")  # Debian: vim, or vim-tiny
    if found is None:
        pytest.skip("needs vim or vim.tiny (scripts/setup.sh installs vim-tiny)")
    return found


def test_15_two_scripted_vim_edits_in_a_row_both_land(wiped, mount, tmp_path):
    """`vim -es -c '%s/a/A/' -c wq f; vim -es -c '%s/b/B/' -c wq f`: on 0c1f342 the second edit was
    dropped with vim exiting 0. The mount showed vim #2 two mtimes for the unchanged file (the old
    one cached by the kernel, then the upload time), so vim asked 'The file has been changed since
    reading it!!! Do you really want to write to it (y/n)?', read EOF and did not write."""
    vim = _vim()
    incoming = mount.path / "Incoming"
    dropped = []
    for n in range(5):
        path = incoming / f"v{n}.txt"  # an absolute path, from a folder outside the mount
        path.write_bytes(b"abc\nabc\n")
        for command in ("%s/a/A/", "%s/b/B/"):
            edit = run(vim, "-u", "NONE", "-i", "NONE", "-es", "-c", command, "-c", "wq", path,
                       cwd=tmp_path, stdin="")
            assert edit.returncode == 0, edit.stdout + edit.stderr
        stored = wiped.get(f"Incoming/v{n}.txt")
        if stored != b"ABc\nABc\n":
            dropped.append(f"v{n}.txt: {stored!r}")
        assert path.read_bytes() == stored
    assert dropped == [], f"an edit was lost in {len(dropped)} of 5: {dropped}"
