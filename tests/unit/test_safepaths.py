"""safepaths: the cache and staging folders are ours and private, never reached through a
symlink another user planted (shared cache folders under /tmp)."""

import errno
import os
import stat

import pytest

from minerva_mount.safepaths import UnsafePath, mkdir_private_at, open_private_dir, open_private_file_at

STRANGER = 65534  # nobody
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another uid needs root")


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def same_folder(fd: int, path) -> bool:
    return os.path.samestat(os.fstat(fd), os.lstat(path))


@pytest.fixture
def victim(tmp_path):
    """Another user's folder, that symlinks point to: must stay as it is."""
    path = tmp_path / "victim"
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    if os.geteuid() == 0:
        os.chown(path, STRANGER, STRANGER)
    yield path
    assert mode(path) == 0o755 and os.listdir(path) == []
    if os.geteuid() == 0:
        assert os.lstat(path).st_uid == STRANGER


@pytest.fixture
def shared(tmp_path):
    """A folder every user may write in, like /tmp (1777)."""
    path = tmp_path / "shared"
    path.mkdir()
    path.chmod(0o1777)
    return path


def refused(path, reason: str, create: bool = True) -> UnsafePath:
    with pytest.raises(UnsafePath) as info:
        fd = open_private_dir(path, create)
        os.close(fd)
    assert info.value.errno == errno.EACCES and isinstance(info.value, PermissionError)
    assert reason in str(info.value)
    return info.value


def test_missing_folders_are_made_0700_and_the_fd_is_the_folder(tmp_path):
    target = tmp_path / "a" / "b" / "staging"
    fd = open_private_dir(target)
    try:
        assert same_folder(fd, target)
        assert [mode(p) for p in (tmp_path / "a", tmp_path / "a" / "b", target)] == [0o700] * 3
    finally:
        os.close(fd)


def test_missing_folder_without_create(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_private_dir(tmp_path / "absent", create=False)
    assert not (tmp_path / "absent").exists()


def test_our_folder_readable_by_others_is_made_0700(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c").chmod(0o755)
    os.close(open_private_dir(tmp_path / "c"))
    assert mode(tmp_path / "c") == 0o700


@pytest.mark.parametrize("name", ["blocks-1048576", "staging"])
def test_planted_symlink_in_a_shared_folder_is_refused(shared, victim, name):
    (shared / name).symlink_to(victim)
    error = refused(shared / name, "is a symlink")
    assert error.path == str(shared / name) and str(shared / name) in str(error)


def test_symlink_to_our_own_folder_is_refused_too(tmp_path):
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "staging").symlink_to(tmp_path / "real")
    refused(tmp_path / "staging", "is a symlink")


def test_a_file_is_not_a_folder(tmp_path):
    (tmp_path / "staging").write_bytes(b"")
    refused(tmp_path / "staging", "is not a folder")


@pytest.mark.parametrize("bits", [0o770, 0o777, 0o1777, 0o720])
def test_our_folder_writable_by_group_or_others_is_refused(tmp_path, bits):
    (tmp_path / "staging").mkdir()
    (tmp_path / "staging").chmod(bits)
    refused(tmp_path / "staging", f"is writable by group/others (mode {bits:04o})")
    assert mode(tmp_path / "staging") == bits  # left as found


@as_root
def test_folder_of_another_user_is_refused(shared):
    (shared / "staging").mkdir(mode=0o700)
    os.chown(shared / "staging", STRANGER, STRANGER)
    refused(shared / "staging", f"is owned by uid {STRANGER}, not you (uid 0)")


def test_symlinked_parent_to_a_safe_folder_is_followed(tmp_path):
    """~/.cache may be a symlink to another disk: parents are resolved, then checked."""
    (tmp_path / "disk").mkdir(mode=0o700)
    (tmp_path / "cache").symlink_to(tmp_path / "disk")
    fd = open_private_dir(tmp_path / "cache" / "staging")
    try:
        assert same_folder(fd, tmp_path / "disk" / "staging")
    finally:
        os.close(fd)


@as_root
def test_parent_of_another_user_is_refused(shared, victim):
    """A planted symlink in a parent leads to the other user's folder, which is refused."""
    (shared / "cache").symlink_to(victim)
    refused(shared / "cache" / "staging", f"{victim} is owned by uid {STRANGER}, neither you")


def test_parent_writable_by_others_without_sticky_bit_is_refused(tmp_path):
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)
    refused(tmp_path / "open" / "cache", "is writable by group/others without the sticky bit (mode 0777)")
    assert not (tmp_path / "open" / "cache").exists()


def test_sticky_shared_parent_is_allowed(shared):
    """`--cache-dir /tmp`: only the folders the daemon makes in it must be private."""
    fd = open_private_dir(shared / "blocks-1048576")
    os.close(fd)
    assert mode(shared / "blocks-1048576") == 0o700


def test_mkdir_private_at_refuses_a_symlink_and_reports_the_full_path(tmp_path, victim):
    fd = open_private_dir(tmp_path / "root")
    try:
        (tmp_path / "root" / "ab").symlink_to(victim)
        with pytest.raises(UnsafePath, match=f"{tmp_path / 'root' / 'ab'} is a symlink"):
            mkdir_private_at(fd, "ab")
        sub = mkdir_private_at(fd, "cd")
        os.close(sub)
        assert mode(tmp_path / "root" / "cd") == 0o700
    finally:
        os.close(fd)


def test_private_files_are_ours_regular_and_never_symlinks(tmp_path):
    fd = open_private_dir(tmp_path / "root")
    root = tmp_path / "root"
    try:
        new = open_private_file_at(fd, "new", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        os.close(new)
        assert mode(root / "new") == 0o600
        (root / "link").symlink_to(root / "new")
        with pytest.raises(UnsafePath, match="link is a symlink"):
            open_private_file_at(fd, "link", os.O_RDONLY)
        os.mkfifo(root / "fifo", 0o600)  # opening it must not block
        with pytest.raises(UnsafePath, match="fifo is not a regular file"):
            open_private_file_at(fd, "fifo", os.O_RDONLY)
        (root / "shared").write_bytes(b"x")
        (root / "shared").chmod(0o666)
        with pytest.raises(UnsafePath, match=r"shared is writable by group/others \(mode 0666\)"):
            open_private_file_at(fd, "shared", os.O_RDONLY)
        if os.geteuid() == 0:
            (root / "theirs").write_bytes(b"x")
            os.chown(root / "theirs", STRANGER, STRANGER)
            with pytest.raises(UnsafePath, match=f"theirs is owned by uid {STRANGER}, not you"):
                open_private_file_at(fd, "theirs", os.O_RDONLY)
    finally:
        os.close(fd)


def test_staging_files_without_a_name_can_be_made_in_the_folder(tmp_path):
    """What staging does with the folder's fd: O_TMPFILE (ext4, tmpfs, xfs, btrfs have it)."""
    fd = open_private_dir(tmp_path / "staging")
    try:
        try:
            tmp = os.open(".", os.O_TMPFILE | os.O_RDWR, 0o600, dir_fd=fd)
        except OSError as exc:
            pytest.skip(f"no O_TMPFILE here: {exc}")
        assert os.pwrite(tmp, b"abc", 0) == 3 and stat.S_IMODE(os.fstat(tmp).st_mode) == 0o600
        os.close(tmp)
        assert os.listdir(tmp_path / "staging") == []
    finally:
        os.close(fd)
