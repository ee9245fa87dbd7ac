"""Extended attributes: read-only status under user.minerva.*, everything else refused fast.

File managers and `ls` query xattrs on every file (security.selinux, ACLs, user.xdg.*), so
each answer comes from memory and never costs a request: ENODATA for a `user.*` name we do not
have, ENOTSUP for setting one (S3 objects carry no xattrs; `cp --preserve=xattr` tolerates it).
Every other namespace (security.*, system.* ACLs, trusted.*) answers ENOTSUP: `ls -l` then
marks the whole file system as having no SELinux labels and no ACLs after the first file and
stops asking; with ENODATA it asks again for every file (two round trips per file, most of
the time of a warm `ls -l`).

What a user or a script can read with getfattr:
- `user.minerva.state` on a file: its state in localfiles.py while it is held here
  (`uploading` while streamed, `staged`, `kept-back`, `publishing`, `failed`), `uploaded` once
  the object is complete in S3.
- `user.minerva.etag` on a file: the object's S3 ETag, once it has one.
- `user.minerva.requests` on the mount root: the S3 requests made so far, by kind, as JSON
  (what tests and benchmarks read before and after an operation).
"""

import json

from .errors import NoData, NotFound, ReadOnlyAttribute, XattrNotSupported
from .localfiles import State
from .namespace import ROOT_INODE

PREFIX = "user.minerva."
STATE, ETAG, REQUESTS = PREFIX + "state", PREFIX + "etag", PREFIX + "requests"
USER = b"user."  # the only namespace this file system has names in


def _values(core, inode: int) -> dict[str, str]:
    try:
        node = core.inodes.get(inode)
    except KeyError:
        raise NotFound(f"inode {inode}") from None
    if inode == ROOT_INODE:
        return {REQUESTS: json.dumps(dict(sorted(core.store.requests.items())))}
    if node.is_dir:
        return {}
    held = core.files.get(node.path)
    if held is not None:
        values = {STATE: held.state.value}
        if held.state is not State.PUBLISHED:
            return values
    else:
        values = {STATE: "uploaded"}
    if node.etag:
        values[ETAG] = node.etag
    return values


def _require_user(name: bytes) -> None:
    if not name.startswith(USER):
        raise XattrNotSupported(f"no {name.decode('utf-8', 'replace').split('.')[0]}.* attributes here")


def get(core, inode: int, name: bytes) -> bytes:
    _require_user(name)
    value = _values(core, inode).get(name.decode("utf-8", "replace"))
    if value is None:
        raise NoData(name.decode("utf-8", "replace"))
    return value.encode()


def names(core, inode: int) -> list[bytes]:
    return [name.encode() for name in _values(core, inode)]


def set_(name: bytes) -> None:
    if name.startswith(PREFIX.encode()):
        raise ReadOnlyAttribute(f"{name.decode('utf-8', 'replace')} is a read-only status attribute")
    raise XattrNotSupported("S3 objects carry no extended attributes")


def remove(name: bytes) -> None:
    if name.startswith(PREFIX.encode()):
        raise ReadOnlyAttribute(f"{name.decode('utf-8', 'replace')} is a read-only status attribute")
    _require_user(name)
    raise NoData(name.decode("utf-8", "replace"))
