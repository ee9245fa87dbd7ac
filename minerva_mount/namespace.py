"""Inodes, names and the per-folder rules of the storage area.

Paths are relative to the org prefix, without a trailing slash: "" is the mount root,
"Incoming/reports/q3.csv" a file. An inode lives while the kernel holds a lookup on it or
a handle is open; `forget` frees it (never unlink: the kernel may still use the number).
"""

import enum
import logging
import re
import time
from dataclasses import dataclass

from .errors import AccessDenied, InvalidName, NameTooLong

log = logging.getLogger("minerva.namespace")

ROOT_INODE = 1
INCOMING, OUTGOING = "Incoming", "Outgoing"
MAX_NAME_BYTES = 255
MAX_KEY_BYTES = 1024 - 64  # S3's key limit, less room for the longest org prefix
SHADOWED_SUFFIX = " (file)"  # shown after a file's name when a folder has the same name


class Area(enum.Enum):
    """Who may do what, decided by the top-level folder a path is in."""

    ROOT = "root"  # the mount root: read-only
    INCOMING = "incoming"  # writable: files are sent in here
    READ_ONLY = "read-only"  # Outgoing/ and any other folder: read, delete, mkdir, rename


def area_of(path: str) -> Area:
    top = path.split("/", 1)[0]
    if "/" not in path:
        # The top-level folders themselves belong to the root: they cannot be removed.
        return Area.ROOT
    return Area.INCOMING if top == INCOMING else Area.READ_ONLY


# Refusals that are expected probes, not failures: a desktop's "move to trash" (GIO, KIO)
# tries to mkdir .Trash-UID (after looking for .Trash) at the top of the mount, and on a
# refusal offers to delete instead (SEMANTICS.md, "Trash: none"). Logged at INFO, so `status`
# does not list each trashing as a recent failure; any other refusal stays a WARNING.
EXPECTED_PROBES = re.compile(r"\.Trash(-\d+)?")


def _refused(path: str, what: str, why: str) -> None:
    probe = what == "mkdir" and EXPECTED_PROBES.fullmatch(path.rsplit("/", 1)[-1])
    level = logging.INFO if probe else logging.WARNING
    log.log(level, "refused %s of %s: %s", what, path or "/", why)


def require_writable(path: str, what: str) -> None:
    """Refuse creating or changing file content outside Incoming/ with EACCES, logged."""
    if area_of(path) is not Area.INCOMING:
        _refused(path, what, "only Incoming/ takes new files")
        raise AccessDenied(f"{what} {path}: only Incoming/ is writable")


def require_changeable(path: str, what: str) -> None:
    """Refuse unlink/mkdir/rmdir/rename at the mount root (Incoming/Outgoing stay)."""
    if area_of(path) is Area.ROOT:
        _refused(path, what, "the mount root is fixed")
        raise AccessDenied(f"{what} {path}: the mount root cannot be changed")


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def check_name(name: bytes) -> str:
    """A name the kernel sent, as text S3 can take, or EINVAL/ENAMETOOLONG."""
    if len(name) > MAX_NAME_BYTES:
        log.warning("refused name %r...: %d bytes, over the 255 a file name may have",
                    name[:40].decode("utf-8", "replace"), len(name))
        raise NameTooLong(f"name of {len(name)} bytes")
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        log.warning("refused name %r: not valid UTF-8, which S3 keys must be", name)
        raise InvalidName("name is not valid UTF-8, which S3 keys must be") from None
    if not text or text in (".", "..") or "/" in text or "\0" in text:
        raise InvalidName(f"name {text!r} cannot be an S3 key component")
    return text


def shown_name(name: str) -> bool:
    """Whether a key component can be shown as a file name; others are skipped, and logged."""
    return bool(name) and name not in (".", "..") and len(name.encode()) <= MAX_NAME_BYTES


# Names programs give a file while they write it, before renaming it (or deleting it). A file
# with such a name is kept locally at close and sent only once renamed to a final name; one
# renamed TO such a name leaves S3 (localfiles.py).
TEMPORARY_NAMES = [
    (re.compile(r".+\.part"), "KDE/KIO and browsers: name.part, renamed when complete"),
    (re.compile(r"\.goutputstream-[A-Za-z0-9]{6}"), "GIO (GNOME Files, gedit): replaced by a rename"),
    # vim: .name.swp, then .swo ... .swa, then .svz ...; .swx is its probe of the folder.
    (re.compile(r"\..+\.(sw[a-px]|sv[a-z])"), "vim swap files (.name.swp, .swx)"),
    (re.compile(r"4913"), "vim's probe of whether it may create files in the folder"),
    (re.compile(r".+~"), "editor backups (name~), written before saving and usually deleted"),
    # mkstemp's six characters; all-lowercase ones are taken as a real extension (.notes.backup),
    # which a random suffix is with odds of 1 in 180.
    (re.compile(r"\..+\.(?=[a-z]*[A-Z0-9])[A-Za-z0-9]{6}"), "rsync's .name.XXXXXX, renamed when complete"),
    (re.compile(r"\.~lock\..+#"), "LibreOffice lock files (.~lock.name#), deleted when closed"),
    (re.compile(r"~\$.+"), "Microsoft Office owner files (~$name), deleted when closed"),
]


def is_marker(path: str) -> bool:
    """Whether `path` names a folder's marker (`dir/`) rather than a file."""
    return path.endswith("/")


def is_temporary(path: str) -> bool:
    """Whether the file name is one programs use while writing, before a rename or delete."""
    name = path.rsplit("/", 1)[-1]
    return any(pattern.fullmatch(name) for pattern, _ in TEMPORARY_NAMES)


@dataclass
class Node:
    inode: int
    path: str
    is_dir: bool
    size: int = 0
    mtime: float = 0.0
    etag: str | None = None
    lookups: int = 0
    opens: int = 0

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent_path(self) -> str:
        return self.path.rsplit("/", 1)[0] if "/" in self.path else ""


class InodeTable:
    def __init__(self):
        self._next = ROOT_INODE + 1
        root = Node(ROOT_INODE, "", True, mtime=time.time(), lookups=1)
        self.by_inode: dict[int, Node] = {ROOT_INODE: root}
        self.by_path: dict[str, Node] = {"": root}

    def get(self, inode: int) -> Node:
        return self.by_inode[inode]

    def find(self, path: str) -> Node | None:
        return self.by_path.get(path)

    def upsert(self, path: str, is_dir: bool, size: int = 0, mtime: float = 0.0,
               etag: str | None = None) -> Node:
        """The node for `path`, created or updated with what S3 says of it now."""
        node = self.by_path.get(path)
        if node is not None and node.is_dir != is_dir:
            self._drop_path(node)
            node = None
        if node is None:
            node = Node(self._next, path, is_dir)
            self._next += 1
            self.by_inode[node.inode] = node
            self.by_path[path] = node
        node.size, node.mtime, node.etag = size, mtime or node.mtime or time.time(), etag
        return node

    def remember(self, node: Node) -> None:
        """The kernel took a reference from a readdir snapshot; the node may have been
        forgotten since the snapshot was taken, so it is registered again."""
        node.lookups += 1
        if self.by_inode.get(node.inode) is not node:
            self.by_inode[node.inode] = node
            self.by_path.setdefault(node.path, node)

    def forget(self, inode: int, count: int) -> None:
        node = self.by_inode.get(inode)
        if node is None or inode == ROOT_INODE:
            return
        node.lookups = max(node.lookups - count, 0)
        self._release_if_unused(node)

    def closed(self, node: Node) -> None:
        node.opens -= 1
        self._release_if_unused(node)

    def _release_if_unused(self, node: Node) -> None:
        if node.lookups == 0 and node.opens == 0:
            del self.by_inode[node.inode]
            self._drop_path(node)

    def _drop_path(self, node: Node) -> None:
        if self.by_path.get(node.path) is node:
            del self.by_path[node.path]

    def removed(self, path: str) -> None:
        """The object is gone: later lookups of the path get a fresh inode."""
        node = self.by_path.pop(path, None)
        if node is not None:
            node.path = node.path + "\0deleted"  # still resolvable by inode until forgotten

    def moved(self, old: str, new: str) -> None:
        """Re-key a node and everything below it after a rename."""
        self.removed(new)
        for path in [p for p in self.by_path if p == old or p.startswith(old + "/")]:
            node = self.by_path.pop(path)
            node.path = new + path[len(old):]
            self.by_path[node.path] = node
