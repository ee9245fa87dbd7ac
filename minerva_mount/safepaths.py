"""Private folders and files on a disk other users share: opened through fds, never via symlinks.

Why: the cache folder may be in a place other users can write, e.g. `--cache-dir /tmp/x`
with /tmp/x at mode 1777. Another user can plant `blocks-1048576` and `staging` there as
symlinks to a folder of theirs before the daemon first starts. A daemon that follows them
chmods that user's folder and writes the org's blocks into it (they can read them), and the
other user can plant blocks of their own that the mount then serves as file content (a
CRC-32 is no authentication). So the daemon never serves bytes another user could write.

The rule (ssh-like):
- A folder we use (the last component of `open_private_dir`'s path, every folder
  `mkdir_private_at` makes or opens) is opened with O_NOFOLLOW and must be ours (the
  effective uid) and writable by nobody else; it is refused if it is a symlink, not a
  folder, someone else's, or writable by group/others. One that is ours but readable by
  others is made 0700 (nobody else can have written into it). Folders we create are 0700.
- Its parents (e.g. /tmp, ~/.cache, a shared 1777 --cache-dir) may be symlinks: the path is
  resolved first, then walked from / one folder at a time with O_NOFOLLOW, and each folder
  must belong to root or to us, and be writable by nobody else unless it has the sticky bit
  (in a sticky folder only an entry's owner, the folder's owner and root can rename or delete
  it). Otherwise someone else could swap the folder we use for theirs.
- Files in a private folder are opened relative to its fd, with O_NOFOLLOW, and must be
  regular files of ours writable by nobody else.
A refusal is an `UnsafePath` (a PermissionError, errno EACCES) whose message names the path
and the reason. Another user can still make the daemon refuse to start (by planting a name
first); that is the price of never using what they planted. Messages name paths through
/proc/self/fd (Linux).
"""

import contextlib
import errno
import os
import stat
from pathlib import Path

from .errors import UnsafePath  # noqa: F401 (callers import it from here too)

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH




def open_private_dir(path: str | Path, create: bool = True) -> int:
    """An fd (O_DIRECTORY|O_NOFOLLOW) of the folder at `path`, made (0700) if missing.

    The folder must be ours and private; its parents owned by root or us, writable by no one
    else unless sticky (missing ones are created 0700 if `create`). Raises UnsafePath if not,
    FileNotFoundError if it is missing and not `create`. The caller closes the fd.
    """
    path = Path(os.path.abspath(path))
    if path == path.parent:
        raise UnsafePath(str(path), "is the root folder")
    parent = _open_parents(Path(os.path.realpath(path.parent)), create)
    try:
        return mkdir_private_at(parent, path.name, create)
    finally:
        os.close(parent)


def mkdir_private_at(dir_fd: int, name: str, create: bool = True) -> int:
    """An fd of folder `name` in `dir_fd`, made 0700 if missing (and `create`); must be private."""
    fd = _open_dir_at(dir_fd, name, create)
    try:
        info = _check_ours(fd, dir_fd, name)
        if stat.S_IMODE(info.st_mode) != 0o700:  # readable by others (or a umask took our bits)
            os.fchmod(fd, 0o700)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_private_file_at(dir_fd: int, name: str, flags: int, mode: int = 0o600) -> int:
    """os.open(name, flags, mode, dir_fd=dir_fd) without following a symlink (nor blocking on
    a FIFO); the file must be a regular file of ours that nobody else can write."""
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePath(_where(dir_fd, name), "is a symlink") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafePath(_where(dir_fd, name), "is not a regular file")
        _check_ours(fd, dir_fd, name)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_ours(fd: int, dir_fd: int, name: str) -> os.stat_result:
    """Refuse `fd` (`name` in `dir_fd`) unless it is ours and nobody else can write it."""
    info = os.fstat(fd)
    if info.st_uid != os.geteuid():
        raise UnsafePath(_where(dir_fd, name), f"is owned by uid {info.st_uid}, not you (uid {os.geteuid()})")
    if info.st_mode & OTHERS_WRITE:
        raise UnsafePath(_where(dir_fd, name),
                         f"is writable by group/others (mode {stat.S_IMODE(info.st_mode):04o})")
    return info


def _open_parents(path: Path, create: bool) -> int:
    """Walk the resolved `path` from / with O_NOFOLLOW; each folder must be safe as a parent."""
    fd = os.open("/", DIR_FLAGS)
    try:
        _check_parent(fd)
        for part in path.parts[1:]:
            child = _open_dir_at(fd, part, create)
            os.close(fd)
            fd = child
            _check_parent(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_parent(fd: int) -> None:
    info = os.fstat(fd)
    if info.st_uid not in (0, os.geteuid()):
        raise UnsafePath(_where(fd), f"is owned by uid {info.st_uid}, neither you (uid {os.geteuid()}) "
                                     "nor root")
    if info.st_mode & OTHERS_WRITE and not info.st_mode & stat.S_ISVTX:
        raise UnsafePath(_where(fd), "is writable by group/others without the sticky bit "
                                     f"(mode {stat.S_IMODE(info.st_mode):04o})")


def _open_dir_at(dir_fd: int, name: str, create: bool) -> int:
    """Open folder `name` (made 0700 first if missing and `create`), never through a symlink."""
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        if not create:
            raise
        with contextlib.suppress(FileExistsError):  # made meanwhile by another daemon
            os.mkdir(name, 0o700, dir_fd=dir_fd)
        return _open_dir_at(dir_fd, name, False)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        try:
            is_link = stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
        except OSError:
            raise exc from None
        raise UnsafePath(_where(dir_fd, name), "is a symlink" if is_link else "is not a folder") from None


def _where(dir_fd: int, name: str = "") -> str:
    """The path of `name` in `dir_fd`, for messages."""
    try:
        folder = os.readlink(f"/proc/self/fd/{dir_fd}")
    except OSError:
        folder = f"<fd {dir_fd}>"
    return os.path.join(folder, name) if name else folder
