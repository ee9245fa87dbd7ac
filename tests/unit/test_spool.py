"""The write-back spool on a real folder: what a crash leaves is found again, whole and once.

The first journal of a file is an xattr of its data file (one fsync for both); later ones, or
any where the file system refuses user xattrs, are `ID.json` files, which take precedence.
"""

import os

import pytest

from minerva_mount.writeback import JOURNAL_XATTR, Spool


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "spool"
    path.mkdir(mode=0o700)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    yield path, fd
    os.close(fd)


def staged(tmp_path, data: bytes) -> int:
    fd = os.open(tmp_path, os.O_TMPFILE | os.O_RDWR, 0o600)
    os.pwrite(fd, data, 0)
    return fd


def restart(folder_fd: int) -> list[tuple[str, bytes]]:
    """A new run's scan of the same folder: (key, content) of each entry found."""
    found = []
    for journal, fd in Spool(folder_fd, 1 << 30).scan():
        found.append((journal.key, os.pread(fd, journal.size + 1, 0)))
        os.close(fd)
    return sorted(found)


def test_a_spooled_file_is_found_again_with_its_journal_in_an_xattr(tmp_path, folder):
    path, fd = folder
    spool = Spool(fd, 1 << 30)
    content = staged(tmp_path, b"hello")
    journal = spool.add(content, "Incoming/a.txt", 5, 1.0)
    assert spool.xattrs and os.listdir(path) == [f"{journal.id}.data"]
    assert os.fstat(content).st_ino == os.stat(path / f"{journal.id}.data").st_ino  # linked, not copied
    assert b"Incoming/a.txt" in os.getxattr(path / f"{journal.id}.data", JOURNAL_XATTR)
    assert restart(fd) == [("Incoming/a.txt", b"hello")]


def test_a_later_journal_file_overrides_the_xattr(tmp_path, folder):
    path, fd = folder
    spool = Spool(fd, 1 << 30)
    journal = spool.add(staged(tmp_path, b"hello"), "Incoming/a.part", 5, 1.0)
    journal.key = "Incoming/a.txt"  # renamed before its upload
    journal.save()
    assert sorted(os.listdir(path)) == [f"{journal.id}.data", f"{journal.id}.json"]
    assert restart(fd) == [("Incoming/a.txt", b"hello")]


def test_without_xattrs_journals_are_files(tmp_path, folder):
    path, fd = folder
    spool = Spool(fd, 1 << 30)
    spool.xattrs = False  # as after a file system refused them
    journal = spool.add(staged(tmp_path, b"hello"), "Incoming/a.txt", 5, 1.0)
    assert sorted(os.listdir(path)) == [f"{journal.id}.data", f"{journal.id}.json"]
    assert restart(fd) == [("Incoming/a.txt", b"hello")]


def test_data_without_a_journal_is_removed_and_removal_is_whole(tmp_path, folder):
    path, fd = folder
    spool = Spool(fd, 1 << 30)
    kept = spool.add(staged(tmp_path, b"kept"), "Incoming/kept", 4, 1.0)
    gone = spool.add(staged(tmp_path, b"gone"), "Incoming/gone", 4, 1.0)
    spool.remove(gone)
    # a crash between the link and the journal: its close had not returned
    os.link(f"/proc/self/fd/{staged(tmp_path, b'half')}", "0123.data", dst_dir_fd=fd, follow_symlinks=True)
    (path / "4567.json.tmp").write_bytes(b"{")  # a journal rewrite cut short
    assert restart(fd) == [("Incoming/kept", b"kept")]
    assert os.listdir(path) == [f"{kept.id}.data"]


def test_an_entry_not_whole_is_left_in_place_and_not_sent(tmp_path, folder):
    path, fd = folder
    spool = Spool(fd, 1 << 30)
    journal = spool.add(staged(tmp_path, b"hello"), "Incoming/a.txt", 5, 1.0)
    os.truncate(path / f"{journal.id}.data", 3)
    assert restart(fd) == []
    assert os.listdir(path) == [f"{journal.id}.data"]  # kept for a person to look at
