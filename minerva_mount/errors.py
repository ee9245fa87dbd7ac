"""Error types shared by every layer.

Each error carries the errno the file system answers with, so the FUSE adapter can map
any of them without knowing where it came from. Messages never contain secrets: they are
built from paths, status codes and error codes only.
"""

import errno
import logging


class MinervaError(Exception):
    """Base class: `errno` is what a file-system caller sees."""

    errno = errno.EIO

    def __init__(self, message: str = "", *, err: int | None = None):
        super().__init__(message)
        if err is not None:
            self.errno = err


class NotFound(MinervaError):
    errno = errno.ENOENT


class AccessDenied(MinervaError):
    errno = errno.EACCES


class NotPermitted(MinervaError):
    errno = errno.EPERM


class Exists(MinervaError):
    errno = errno.EEXIST


class NotEmpty(MinervaError):
    errno = errno.ENOTEMPTY


class IsADirectory(MinervaError):
    errno = errno.EISDIR


class NotADirectory(MinervaError):
    errno = errno.ENOTDIR


class InvalidName(MinervaError):
    errno = errno.EINVAL


class NameTooLong(MinervaError):
    errno = errno.ENAMETOOLONG


class Busy(MinervaError):
    errno = errno.EBUSY


def busy(message: str) -> Busy:
    """An EBUSY refusal, logged with its path and reason: no refusal is silent (tenet 2)."""
    logging.getLogger("minerva.core").warning("refused: %s", message)
    return Busy(message)


class NotSupported(MinervaError):
    errno = errno.EOPNOTSUPP


class NoSpace(MinervaError):
    """The staging disk is full: the write or close fails, nothing half-written is sent."""

    errno = errno.ENOSPC


class TooBig(MinervaError):
    """Larger than S3 can hold (5 TiB): EFBIG, as a local file system answers past its limit."""

    errno = errno.EFBIG


class StoreError(MinervaError):
    """An S3 request failed after retries (server down, throttled, malformed answer)."""

    errno = errno.EIO


class CredentialError(MinervaError):
    """The credential endpoint refused or failed; `fatal` when retrying cannot help."""

    errno = errno.EIO

    def __init__(self, message: str, *, fatal: bool = False, err: int | None = None):
        super().__init__(message, err=err)
        self.fatal = fatal


class NoData(MinervaError):
    """No such extended attribute (a `user.*` name we do not have)."""

    errno = errno.ENODATA


class XattrNotSupported(MinervaError):
    """Extended attributes of other namespaces, or setting one: S3 objects carry none."""

    errno = errno.ENOTSUP


class ReadOnlyAttribute(MinervaError):
    """A user.minerva.* status attribute: read-only."""

    errno = errno.EPERM


class NotSequential(MinervaError):
    """A write out of order on a file streamed front to back (writer.Upload)."""

    errno = errno.EOPNOTSUPP


class ObjectChanged(StoreError):
    """The object's ETag no longer matches the one a read started with."""


class UnsafePath(PermissionError):
    """A folder or file another user could control: not used (safepaths.py). `path` is the one
    refused, `reason` why ("is a symlink", "is owned by uid N, not you (uid M)", ...). An
    OSError, so callers that open paths handle it with the other OSErrors."""

    def __init__(self, path: str, reason: str):
        super().__init__(errno.EACCES, f"{path} {reason}; refusing to use it")
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return self.strerror
