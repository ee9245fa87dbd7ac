"""Model test of Core (issue 11, item 7): random programs against a reference model.

A Hypothesis state machine drives Core over an in-memory store (ModelStore: FakeStore that
fails on demand) the way programs and the kernel do, and after every step compares Core
with a deliberately simple reference model of what is promised (README "How files are
written", SEMANTICS.md), as mountpoint-s3's reftests do. Regressions it found are written
out in test_core_regressions.py.

What a step can be
- create (O_WRONLY|O_TRUNC: a stream; O_RDWR|O_TRUNC; O_RDWR and O_RDONLY without O_TRUNC:
  a file created as a side effect; O_WRONLY|O_APPEND; with or without O_EXCL) and open
  (O_RDONLY, O_WRONLY|O_TRUNC, O_RDWR, O_RDWR|O_TRUNC, O_WRONLY|O_APPEND, O_RDWR|O_APPEND,
  O_WRONLY), keeping the descriptor; dup of a descriptor;
- pwrite at any offset (at the end for O_APPEND), read at any offset, ftruncate;
- close of a descriptor = Core.flush(fh); the kernel's RELEASE of an fh comes after its last
  descriptor is closed, at once or some steps later (it is asynchronous);
- truncate, unlink, rename (onto existing names too; files and folders), mkdir, rmdir by
  path, as the kernel sends them: path walk by lookups, the kernel's own checks emulated;
- temporary names (a.part, .a.swp, b~) next to final ones (a, b);
- changes made outside (objects put or deleted directly in the store; then the listing TTL
  passes);
- a failure injected into one request kind, once or until healed; a staging disk that is full
  (ENOSPC) or gives short writes; a rename or unlink while a close is publishing (its PUT held
  at a gate).

What is checked
- at each call: success, or an errno from the set the model accepts (EIO/ENOSPC only when an
  injected failure fired meanwhile); a refused call changes nothing; a read returns the
  model's bytes;
- after every step: every object in the store is one the model allows (the content of a
  close that returned success, of a truncate or rename that did, or an outside put); a close
  that failed makes no object appear; a deleted or renamed-away name never comes back; no
  object is sent under a temporary name; every folder's listing (opendir/readdir) has the
  model's names and sizes, files held locally included; getattr of every open file has the
  model's size;
- at the end (every descriptor closed, every fh released): drain names exactly the files
  kept back;
- a step that does not end within STEP_TIMEOUT seconds (a wait nothing ends) fails.

Where the model makes a choice the documents leave open, it says so (search "PROMISE").
"""

import contextlib
import errno
import functools
import os
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule, run_state_machine_as_test
from model_support import (
    KINDS,
    PART,
    ModelStore,
    TrioThread,
    make_core,
    quiet_logs,
    set_small_parts,
    ttl_passes,
)

from minerva_mount.errors import MinervaError
from minerva_mount.namespace import ROOT_INODE

try:
    from minerva_mount.namespace import is_temporary
except ImportError:  # before the rewrite it lived in staging.py
    from minerva_mount.staging import is_temporary

E = errno
NAMES = ["a", "b", "a.part", ".a.swp", "b~"]
SUBDIRS = ["Incoming/d", "Incoming/e", "Outgoing/d"]

# Flags of open and create, by short name. "R": read-only; "W": write-only truncating (a
# stream for a final name); "RW"; "RWT": read-write truncating; "WA"/"RWA": appending;
# "WN": write-only, not truncating.
OPEN_FLAGS = {
    "R": os.O_RDONLY, "W": os.O_WRONLY | os.O_TRUNC, "RW": os.O_RDWR,
    "RWT": os.O_RDWR | os.O_TRUNC, "WA": os.O_WRONLY | os.O_APPEND,
    "RWA": os.O_RDWR | os.O_APPEND, "WN": os.O_WRONLY,
}
CREATE_FLAGS = {
    "W": os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "RWT": os.O_RDWR | os.O_CREAT | os.O_TRUNC,
    "RW": os.O_RDWR | os.O_CREAT, "R": os.O_RDONLY | os.O_CREAT,
    "WA": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
}
SIDE_EFFECT_CREATES = ("RW", "R")  # read-write or read-only without O_TRUNC (SEMANTICS)

STEP_TIMEOUT = 10.0  # seconds: a step (calls on an in-memory store) taking longer hangs
PUBLISHING = ("put", "create_multipart", "upload_part", "complete_multipart")  # drawn twice as often
CALLS: list = []  # (call, outcome) of every Core call the model judged (MODEL_STATS=1)


def parent_of(path: str) -> str:
    return path.rpartition("/")[0]


def name_of(path: str) -> str:
    return path.rpartition("/")[2]


def temporary(path: str) -> bool:
    """A name kept back (README "Temporary names are kept back"): only files written here,
    in Incoming/, are held; elsewhere such a name is an ordinary object."""
    return path.startswith("Incoming/") and is_temporary(path)


def writable_area(path: str) -> bool:
    return path.startswith("Incoming/")


def show(err) -> str:
    if isinstance(err, set):
        return "{" + ", ".join(sorted(show(e) for e in err)) + "}"
    return "success" if err is None else errno.errorcode.get(err, str(err))


class Done(Exception):
    """The step ended early, as the model expected (a refusal, an accepted failure)."""


@dataclass(eq=False)
class File:
    """A file as programs see it (an inode): its bytes, its name, what of it S3 holds."""

    data: bytearray
    path: str | None  # None: unlinked or replaced (detached); never sent again
    published: bytes | None = None  # the content S3 holds for it under `path` (last sent)
    side_effect: bool = False  # created read-write/read-only without O_TRUNC, never written
    tainted: bool = False  # an injected failure hit one of its requests (a background part)
    lost: bool = False  # its close failed: it shows what S3 holds once released
    changed: bool = False  # written or truncated since last sent (perhaps back to S3's bytes)
    pending: bool = False  # write-back: sent (spooled) since the spool last drained
    stuck: bool = False  # write-back: its upload failed for good; kept in the spool
    versions: list[bytes] = field(default_factory=list)

    def __post_init__(self):
        self.versions.append(bytes(self.data))

    def set(self, data) -> None:
        self.data = bytearray(data)
        self.versions.append(bytes(data))
        self.changed = True
        self.side_effect = False  # SEMANTICS: "sent if written, truncated or renamed"

    def unsent(self) -> bool:
        """Its content is not what S3 holds (or nothing was ever sent)."""
        return self.published is None or self.published != bytes(self.data)


@dataclass(eq=False)
class Fh:
    """An open file description: what open/create returned; descriptors share it."""

    fh: int
    inode: int
    file: File
    mode: str
    readable: bool
    writable: bool  # opened for writing: its last close may publish
    append: bool
    streaming: bool  # a write-only truncating open of a final name (streamed upload)
    first_version: int
    live: bool | None  # opened while the file was held here: it reads the shared local
    # content (None: the model cannot tell, write-back's upload may have ended the holding)
    descs: int = 1
    stream_max: int = 0  # largest size reached while streaming: past PART a part went up
    moved: bool = False  # the file was renamed or unlinked since this open
    served: list[tuple[int, bytes]] = field(default_factory=list)  # (offset, bytes) it read


class CoreModel(RuleBasedStateMachine):
    staging_dir = "/tmp/minerva-model-staging"
    clock = None  # the trio loop's clock (the write-back model's MockClock)

    def __init__(self):
        super().__init__()
        self.store = ModelStore()
        self.files: dict[str, File] = {}
        self.dirs: set[str] = {"", "Incoming", "Outgoing"}
        self.ok: dict[str, set[bytes | None]] = {}  # key -> contents the store may hold
        self.resolve: dict[str, callable] = {}  # key -> fn(observed), after this step's check
        self.descs: list[Fh] = []  # the descriptor table (a dup appears twice)
        self.fhs: dict[int, Fh] = {}  # open file descriptions not yet released
        self.unreleased: list[Fh] = []  # last descriptor closed, RELEASE not sent yet
        self.fired_seen = 0
        self.broken = False
        self.disk = None  # the FillingDisk staging area, when Core takes one
        self.loop = TrioThread(self._make_core, clock=self.clock)
        self.core = self.loop.value

    def _make_core(self, nursery):
        core, self.disk = make_core(
            self.store, nursery, self.staging_dir,
            still_open=lambda fh: fh in self.fhs and self.fhs[fh].descs > 0)
        return core

    def faults(self) -> int:
        """Injected failures so far: store requests refused, staging writes refused."""
        return len(self.store.fired) + (self.disk.refusals if self.disk is not None else 0)

    def teardown(self):
        try:
            if not self.broken:  # after a failed step, only the loop is stopped
                self.broken = True
                self.loop.run(self._finish)
        finally:
            self.loop.close()
            if self.disk is not None:
                self.disk.close()

    # ----- running one step -----------------------------------------------------------

    def step(self, afn, *args):
        assert not self.broken
        self.broken = True
        self.loop.run(self._step, afn, args)
        self.broken = False

    async def _step(self, afn, args):
        # A step that does not end is a failure too (a wait that nothing ends).
        with trio.fail_after(STEP_TIMEOUT):
            with contextlib.suppress(Done):
                await afn(*args)
            # Core's background tasks (parts going up) run to where they wait before the
            # next step, so every step sees the same interleaving whatever the threads do.
            await trio.testing.wait_all_tasks_blocked()
            self._note_fired()
            await self._check()
            await trio.testing.wait_all_tasks_blocked()

    def _note_fired(self) -> None:
        """Taint the files an injected failure hit (a background part upload, say)."""
        for _, keys in self.store.fired[self.fired_seen:]:
            for f in self._all_files():
                if f.path in keys:
                    f.tainted = True
        self.fired_seen = len(self.store.fired)

    def _all_files(self) -> list[File]:
        seen = {id(f): f for f in self.files.values()}
        for h in self.fhs.values():
            seen.setdefault(id(h.file), h.file)
        return list(seen.values())

    async def call(self, what: str, allowed: set[int], fn, *args, success: bool = True,
                   files=(), on_fail=None):
        """Await fn(*args); the outcome must be success (if `success`) or an errno in
        `allowed`, or EIO/ENOSPC when an injected failure fired meanwhile (or hit one of
        `files` earlier). Returns the result; raises Done on an accepted failure."""
        faults = self.faults()
        try:
            result = await fn(*args)
        except MinervaError as exc:
            err = exc.errno
            CALLS.append((what.split()[0], show(err)))
            injected = self.faults() > faults or any(f.tainted for f in files)
            if not (err in (E.EIO, E.ENOSPC) and injected):
                expected = ("success or " if success else "") + (show(allowed) if allowed else "")
                assert err in allowed, f"{what}: {show(err)} ({exc}); the model expects {expected}"
            if on_fail is not None:
                on_fail(err)
            raise Done from None
        assert success, f"{what}: succeeded; the model expects {show(allowed)}"
        CALLS.append((what.split()[0], "ok"))
        return result

    # ----- the model's view ------------------------------------------------------------

    def kind(self, path: str):
        if path in self.dirs:
            return "dir"
        if path in self.files:
            return "file"
        return None

    def children(self, dir_path: str) -> list[str]:
        prefix = dir_path + "/" if dir_path else ""
        names = [p[len(prefix):] for p in [*self.dirs, *self.files]
                 if p.startswith(prefix) and p != dir_path and "/" not in p[len(prefix):]]
        return sorted(names)

    def unsure(self, path: str) -> bool:
        """The model does not say what this name shows (a failed close not yet released)."""
        return any(f.lost and f.path is not None and (f.path == path or f.path.startswith(path + "/"))
                   for f in self._all_files())

    def handles_of(self, f: File) -> list[Fh]:
        return [h for h in self.fhs.values() if h.file is f]

    def open_writers(self, f: File, but: Fh | None = None) -> list[Fh]:
        return [h for h in self.handles_of(f) if h.writable and h.descs > 0 and h is not but]

    def being_streamed(self, f: File) -> bool:
        return any(h.streaming and h.descs > 0 for h in self.handles_of(f))

    def stream_past_first_part(self, f: File) -> bool:
        return any(h.streaming and h.descs > 0 and h.stream_max >= PART for h in self.handles_of(f))

    def kept_back(self, f: File) -> bool:
        """Held here until renamed to a final name: a temporary name, or a file created as
        a side effect and never written (README, SEMANTICS)."""
        return f.path is not None and f.unsent() and (temporary(f.path) or f.side_effect)

    def quiet(self, path: str) -> bool:
        """No handle, nothing held locally: outside changes may touch it."""
        f = self.files.get(path)
        return f is None or (not self.handles_of(f) and not f.unsent() and not f.changed and not f.lost)

    def expect(self, key: str, *values) -> None:
        self.ok[key] = set(values)

    def allowed(self, key: str) -> set:
        return set(self.ok.get(key, {None}))

    # ----- path walk, as the kernel does it ---------------------------------------------

    async def walk(self, path: str) -> int:
        """The inode of an existing folder, by lookups from the root."""
        inode = ROOT_INODE
        done = ""
        for part in path.split("/") if path else []:
            done = f"{done}/{part}" if done else part
            node = await self.look(inode, done)
            if node is None or not node.is_dir:
                raise Done  # ENOENT, ENOTDIR from the kernel
            inode = node.inode
        return inode

    async def look(self, parent_inode: int, path: str):
        """Lookup of `path` in its folder; it must agree with the model. None if absent."""
        kind = self.kind(path)
        faults = self.faults()
        try:
            node = await self.core.lookup(parent_inode, name_of(path).encode())
        except MinervaError as exc:
            if exc.errno == E.EIO and self.faults() > faults:
                raise Done from None
            assert kind is None and exc.errno == E.ENOENT, \
                f"lookup {path}: {show(exc.errno)} ({exc}); the model: {kind or 'no such name'}"
            return None
        assert kind is not None, f"lookup {path}: found (is_dir {node.is_dir}); the model: no such name"
        assert node.is_dir == (kind == "dir"), f"lookup {path}: is_dir {node.is_dir}; the model: {kind}"
        return node

    async def parent(self, path: str) -> int:
        return await self.walk(parent_of(path))

    async def file_node(self, path: str):
        """Walk to an existing file, or end the step (ENOENT, EISDIR... from the kernel)."""
        if self.unsure(path):
            raise Done
        parent = await self.parent(path)
        node = await self.look(parent, path)
        if node is None or node.is_dir:
            raise Done
        return parent, node

    # ----- checks after every step ------------------------------------------------------

    async def _check(self) -> None:
        self.store.suspended = True
        try:
            self._check_store()
            for key, fn in list(self.resolve.items()):
                fn(self.store.content(key))
            self.resolve.clear()
            await self._check_listings()
            await self._check_open_sizes()
        finally:
            self.store.suspended = False

    def _check_store(self) -> None:
        for key in sorted(set(self.store.objects) | set(self.ok)):
            have, want = self.store.content(key), self.allowed(key)
            assert have in want, f"store: {key!r} holds {have!r}; the model allows {sorted(want, key=repr)}"
        for kind, key in self.store.writes:
            # (A CopyObject may move an object that has such a name with its folder.)
            assert kind == "copy" or not temporary(key), \
                f"store: the mount sent {kind} of {key!r}, a temporary name"

    async def _check_listings(self) -> None:
        for dir_path in sorted(self.dirs):
            inode = ROOT_INODE if dir_path == "" else await self._inode_quiet(dir_path)
            fh = await self.core.opendir(inode)
            try:
                entries = {name: node for name, node in self.core.readdir(fh, 0)}
            finally:
                self.core.releasedir(fh)
            want = self.children(dir_path)
            optional = {name_of(f.path) for f in self._all_files()
                        if f.lost and f.path is not None and parent_of(f.path) == dir_path}
            got = sorted(entries)
            assert set(got) - optional == set(want) - optional, \
                f"listing of {dir_path or '/'}: {got}; the model: {want}"
            for name, node in entries.items():
                path = f"{dir_path}/{name}" if dir_path else name
                if path in self.dirs:
                    assert node.is_dir, f"listing of {dir_path}: {name} is a file; the model: a folder"
                    continue
                f = self.files.get(path)
                if f is None:
                    continue
                sizes = {len(f.data)}
                if f.lost:
                    sizes |= {len(v) for v in self.allowed(path) if v is not None}
                assert not node.is_dir and node.size in sizes, \
                    f"listing of {dir_path}: {name} size {node.size} (dir {node.is_dir}); the model: {sizes}"

    async def _inode_quiet(self, path: str) -> int:
        inode = ROOT_INODE
        for part in path.split("/"):
            try:
                inode = (await self.core.lookup(inode, part.encode())).inode
            except MinervaError as exc:
                raise AssertionError(f"lookup of the folder {path}: {show(exc.errno)} ({exc}); "
                                     "the model: it exists") from None
        return inode

    async def _check_open_sizes(self) -> None:
        """getattr of an open file: the size programs see in fstat, and O_APPEND writes at."""
        for h in list(self.fhs.values()):
            f = h.file
            if f.path is None or f.lost or self.files.get(f.path) is not f:
                continue
            node = await self.core.getattr(h.inode)
            assert node.size == len(f.data), \
                f"getattr of open {f.path} (fh {h.fh}): size {node.size}; the model: {len(f.data)}"

    # ----- strategies ---------------------------------------------------------------------

    file_paths = st.builds(lambda d, n: f"{d}/{n}",
                           st.sampled_from(["Incoming", "Incoming/d", "Incoming/e", "Outgoing"]),
                           st.sampled_from(NAMES))
    incoming_paths = st.builds(lambda d, n: f"{d}/{n}",  # (Outgoing/: EACCES, now and then)
                               st.sampled_from(["Incoming", "Incoming/d", "Incoming/e"] * 3 + ["Outgoing"]),
                               st.sampled_from(NAMES))
    payloads = st.binary(min_size=1, max_size=2 * PART + 4)
    sizes = st.integers(min_value=0, max_value=2 * PART + 4)

    def desc_index(self, data, pred):
        choices = [i for i, h in enumerate(self.descs) if pred(h)]
        if not choices:
            return None
        return data.draw(st.sampled_from(choices), label="descriptor")

    # ----- rules: opening ---------------------------------------------------------------

    @rule(path=incoming_paths, mode=st.sampled_from(list(CREATE_FLAGS)), excl=st.booleans())
    def create(self, path, mode, excl):
        self.step(self._create, path, mode, excl)

    async def _create(self, path, mode, excl):
        if self.unsure(path):
            return
        parent = await self.parent(path)
        node = await self.look(parent, path)
        if node is not None:  # the kernel opens an existing name (or answers EEXIST itself)
            if not excl and not node.is_dir:
                await self._open_node(path, node.inode, mode)
            return
        allowed = set() if writable_area(path) else {E.EACCES}
        fh, node = await self.call(f"create {path} {mode}", allowed, self.core.create, parent,
                                   name_of(path).encode(), CREATE_FLAGS[mode] | (os.O_EXCL if excl else 0),
                                   success=writable_area(path))
        f = File(bytearray(), path, side_effect=mode in SIDE_EFFECT_CREATES)
        self.files[path] = f
        self._add_fh(fh, node.inode, f, mode, created=True)

    @rule(path=file_paths, mode=st.sampled_from(list(OPEN_FLAGS)))
    def open(self, path, mode):
        self.step(self._open, path, mode)

    async def _open(self, path, mode):
        _, node = await self.file_node(path)
        await self._open_node(path, node.inode, mode)

    async def _open_node(self, path, inode, mode):
        f = self.files[path]
        flags = OPEN_FLAGS[mode]
        writing = mode != "R"
        allowed, success = set(), True
        if writing and not writable_area(path):
            allowed, success = {E.EACCES}, False
        elif self.being_streamed(f):
            allowed = {E.EBUSY}  # SEMANTICS: a file being streamed cannot be read or reopened for writing
        fh = await self.call(f"open {path} {mode}", allowed, self.core.open, inode, flags,
                             success=success, files=[f])
        if flags & os.O_TRUNC and f.data:
            f.set(b"")
        if flags & os.O_TRUNC:
            # An O_TRUNC open means the file (`exec 3<>f; : > f`): it is no longer a side
            # effect kept back (M25; fileops.py `wanted`). Other opens leave it kept back.
            f.side_effect = False
        self._add_fh(fh, inode, f, mode, created=False)

    def _add_fh(self, fh: int, inode: int, f: File, mode: str, created: bool) -> None:
        assert fh not in self.fhs, f"fh {fh} given twice"
        writable = mode != "R"
        # A stream: a write-only truncating open of a final name. When another writer holds the
        # file, Core may join it instead; calling it a stream anyway only widens what is
        # accepted (EBUSY for readers, EOPNOTSUPP after the first part).
        streaming = (mode in ("W", "WA") if created else mode == "W") and not temporary(f.path)
        # README: handles on a file changed through a local copy share it; a read-only
        # handle opened while the file is held here reads that copy, live.
        live = writable or f.unsent() or any(h.writable for h in self.handles_of(f))
        h = Fh(fh, inode, f, mode, readable=mode in ("R", "RW", "RWT", "RWA"), writable=writable,
               append=mode in ("WA", "RWA"), streaming=streaming, first_version=len(f.versions) - 1,
               live=live)
        self.fhs[fh] = h
        self.descs.append(h)

    @precondition(lambda self: self.descs)
    @rule(data=st.data())
    def dup(self, data):
        h = self.descs[self.desc_index(data, lambda h: True)]
        h.descs += 1
        self.descs.append(h)

    # ----- rules: reading and writing ----------------------------------------------------

    @precondition(lambda self: any(h.writable for h in self.descs))
    @rule(data=st.data(), payload=payloads, where=st.integers(min_value=-1, max_value=2 * PART + 4))
    def write(self, data, payload, where):
        self.step(self._write, self.descs[self.desc_index(data, lambda h: h.writable)], payload, where)

    async def _write(self, h: Fh, payload: bytes, where: int):
        f = h.file
        if f.lost:
            return
        size = len(f.data)
        offset = size if (h.append or where < 0) else where
        allowed = set()
        if h.streaming and offset != size and h.stream_max >= PART:
            allowed = {E.EOPNOTSUPP}  # README: out of order after the first part: EOPNOTSUPP
        await self.call(f"write {f.path} fh {h.fh} at {offset} ({len(payload)} bytes)", allowed,
                        self.core.write, h.fh, offset, payload, files=[f])
        data = bytearray(f.data)
        data += bytes(max(0, offset - len(data)))
        data[offset:offset + len(payload)] = payload
        f.set(data)
        if h.streaming:
            h.stream_max = max(h.stream_max, len(data))

    @precondition(lambda self: any(h.readable for h in self.descs))
    @rule(data=st.data(), offset=st.integers(min_value=0, max_value=2 * PART + 4),
          size=st.integers(min_value=1, max_value=3 * PART))
    def read(self, data, offset, size):
        self.step(self._read, self.descs[self.desc_index(data, lambda h: h.readable)], offset, size)

    async def _read(self, h: Fh, offset: int, size: int):
        f = h.file
        changed = len(f.versions) - 1 > h.first_version or h.moved or f.lost
        old_ok = not h.live and changed
        unknown = h.live is None  # live, or a reader of the object: either is right
        got = bytes(await self.call(f"read {f.path} fh {h.fh} at {offset} size {size}",
                                    {E.EIO} if old_ok else set(), self.core.read, h.fh, offset, size,
                                    files=[f]))
        h.served.append((offset, got))
        current = bytes(f.data[offset:offset + size])
        if not old_ok or (unknown and got == current):
            assert got == current, f"read {f.path} fh {h.fh} at {offset}: {got!r}; the model: {current!r}"
            return
        # SEMANTICS: a reader of a file changed since it opened it gets the old bytes, then EIO
        # (or an early end of file), never a mix: one version, any it had since, gives every
        # read made through this handle (each read whole, or cut short).
        versions = f.versions[h.first_version:]
        assert any(all(v[o:o + len(b)] == b for o, b in h.served) for v in versions), \
            (f"read {f.path} fh {h.fh} at {offset}: {got!r}; no version the file had since this "
             f"open gives every read made through it: {h.served} vs {versions}")

    @rule(path=file_paths)
    def read_path(self, path):
        self.step(self._read_path, path)

    async def _read_path(self, path):
        """open, read it all, close: what `cat` does."""
        _, node = await self.file_node(path)
        f = self.files[path]
        allowed = {E.EBUSY} if self.being_streamed(f) else set()
        fh = await self.call(f"open {path} R", allowed, self.core.open, node.inode, os.O_RDONLY, files=[f])
        try:
            got = bytes(await self.call(f"read {path}", set(), self.core.read, fh, 0, 1 << 16, files=[f]))
            assert got == bytes(f.data), f"read {path}: {got!r}; the model: {bytes(f.data)!r}"
            await self.call(f"close {path}", set(), self.core.flush, fh, files=[f])
        finally:
            await self.core.release(fh)

    @precondition(lambda self: any(h.writable for h in self.descs))
    @rule(data=st.data(), size=sizes)
    def ftruncate(self, data, size):
        self.step(self._ftruncate, self.descs[self.desc_index(data, lambda h: h.writable)], size)

    async def _ftruncate(self, h: Fh, size: int):
        f = h.file
        if f.lost or f.path is None or size == len(f.data):
            return  # not modelled: ftruncate of an unlinked file; to the same size (see _truncate)
        allowed = set()
        if h.streaming and size != len(f.data) and h.stream_max >= PART:
            allowed = {E.EOPNOTSUPP}
        await self.call(f"ftruncate {f.path} fh {h.fh} to {size}", allowed,
                        functools.partial(self.core.setattr, h.inode, size=size), files=[f])
        self._truncated(f, size)

    def _truncated(self, f: File, size: int) -> None:
        if size != len(f.data):
            f.set(bytes(f.data[:size]) + bytes(max(0, size - len(f.data))))

    # ----- rules: closing ----------------------------------------------------------------

    @precondition(lambda self: self.descs)
    @rule(data=st.data(), release_now=st.booleans())
    def close(self, data, release_now):
        self.step(self._close, self.desc_index(data, lambda h: True), release_now)

    async def _close(self, i: int, release_now: bool):
        h = self.descs.pop(i)
        h.descs -= 1
        f = h.file
        what = f"close {f.path} fh {h.fh}"
        if h.descs > 0:
            # SEMANTICS: close() of a copy of a descriptor does not publish.
            await self.call(what + " (a dup remains)", set(), self.core.flush, h.fh, files=[f])
            return
        self.unreleased.append(h)
        failed = False

        def lost(err):
            nonlocal failed
            failed = f.lost = True

        try:
            if (h.writable and not self.open_writers(f, but=h) and f.path is not None and not f.lost
                    and f.unsent() and not self.kept_back(f)):
                # SEMANTICS: the last close of a file written (or created, truncated) through
                # the mount returns once the object is in S3, or fails and nothing new is there.
                await self.call(what, set(), self.core.flush, h.fh, files=[f], on_fail=lost)
                if f.path is not None:  # (an unlink may have come meanwhile: rename_during_close)
                    self.expect(f.path, bytes(f.data))
                    self._sent(f)
            else:
                await self.call(what, set(), self.core.flush, h.fh, files=[f])
        except Done:
            pass
        if release_now or failed:
            await self._release(h)

    def _sent(self, f: File) -> None:
        f.published = bytes(f.data)
        f.tainted = f.side_effect = f.changed = False

    @precondition(lambda self: self.unreleased)
    @rule(data=st.data())
    def release(self, data):
        self.step(self._release, data.draw(st.sampled_from(self.unreleased), label="unreleased fh"))

    async def _release(self, h: Fh):
        self.unreleased.remove(h)
        f = h.file
        sent = len(self.store.writes), self.store.requests["delete"]
        try:
            await self.core.release(h.fh)
        except MinervaError as exc:
            # (The kernel ignores RELEASE's answer: nothing may fail there.)
            raise AssertionError(f"release fh {h.fh} of {f.path}: {exc!r}") from None
        # SEMANTICS: close publishes; with every close known to be the last or not (still_open),
        # nothing is left for the release to send.
        assert (len(self.store.writes), self.store.requests["delete"]) == sent, \
            f"release fh {h.fh} of {f.path} changed S3: {self.store.writes[sent[0]:]}"
        del self.fhs[h.fh]
        if f.lost and not self.handles_of(f) and f.path is not None:
            self.resolve[f.path] = lambda observed, f=f: self._revert(f, observed)

    def _revert(self, f: File, observed) -> None:
        """SEMANTICS: after a failed close nothing new is in S3; once released, the name
        shows what S3 holds (an older object, or nothing)."""
        if f.path is None:
            return
        path = f.path
        self._detach(f)
        self.expect(path, observed)
        if observed is not None:
            self.files[path] = File(bytearray(observed), path, published=observed)

    # ----- rules: names ------------------------------------------------------------------

    @rule(path=file_paths, size=sizes)
    def truncate(self, path, size):
        self.step(self._truncate, path, size)

    async def _truncate(self, path, size):
        _, node = await self.file_node(path)
        f = self.files[path]
        if size == len(f.data) and writable_area(path):
            return  # PROMISE not made: whether a truncate to the same size is a change (mtime)
        allowed, success = set(), True
        if not writable_area(path):
            allowed, success = {E.EACCES}, size == len(f.data)  # (to the same size: a no-op)
        elif self.stream_past_first_part(f) and size != len(f.data):
            allowed = {E.EOPNOTSUPP}
        await self.call(f"truncate {path} to {size}", allowed,
                        functools.partial(self.core.setattr, node.inode, size=size), success=success,
                        files=[f])
        self._truncated(f, size)
        if f.unsent() and not self.open_writers(f) and not self.kept_back(f):
            # PROMISE: truncate by path of a file nobody holds open for writing is in S3 when
            # it returns (no later close would report a failure).
            self.expect(path, bytes(f.data))
            self._sent(f)

    @rule(path=file_paths)
    def unlink(self, path):
        self.step(self._unlink, path)

    async def _unlink(self, path):
        parent, _ = await self.file_node(path)
        f = self.files[path]
        # SEMANTICS: any file can be unlinked, a stream too (then it is never sent).
        await self.call(f"unlink {path}", set(), self.core.unlink, parent, name_of(path).encode(), files=[f])
        self._detach(f)
        self.expect(path, None)

    def _detach(self, f: File) -> None:
        if f.path is not None and self.files.get(f.path) is f:
            del self.files[f.path]
        f.path = None
        for h in self.handles_of(f):
            h.moved = True

    @rule(src=file_paths | st.sampled_from(SUBDIRS), dst=file_paths | st.sampled_from(SUBDIRS))
    def rename(self, src, dst):
        self.step(self._rename, src, dst)

    async def _rename(self, src, dst):
        if self.unsure(src) or self.unsure(dst):
            return
        src_parent = await self.parent(src)
        src_node = await self.look(src_parent, src)
        if src_node is None:
            return
        dst_parent = await self.parent(dst)
        dst_node = await self.look(dst_parent, dst)
        kind, dst_kind = self.kind(src), self.kind(dst)
        # The kernel's own checks (vfs_rename): nothing reaches the file system.
        if src == dst or dst.startswith(src + "/") or src.startswith(dst + "/"):
            return  # a no-op, EINVAL or ENOTEMPTY
        if dst_node is not None and (dst_kind == "dir") != (kind == "dir"):
            return  # EISDIR / ENOTDIR
        what = f"rename {src} -> {dst}"
        args = (src_parent, name_of(src).encode(), dst_parent, name_of(dst).encode())
        if dst.split("/")[0] != "Incoming" and src.split("/")[0] != dst.split("/")[0]:
            await self.call(what, {E.EPERM}, self.core.rename, *args, success=False)  # into Outgoing/
        if kind == "dir":
            await self._rename_dir(src, dst, what, args)
        else:
            await self._rename_file(src, dst, what, args)

    async def _rename_file(self, src, dst, what, args):
        f, old = self.files[src], self.files.get(dst)
        # README: a stream is renamed locally before its first part went up; after, EBUSY.
        allowed = {E.EBUSY} if self.stream_past_first_part(f) else set()
        before_dst, before_src = self.allowed(dst), self.allowed(src)

        def failed(err):
            if err == E.EIO:  # SEMANTICS: the file under both names, or the old one only
                self.ok[dst] = before_dst | before_src
                self.resolve[dst] = lambda observed: self._after_failed_rename(src, dst, observed, before_dst)

        await self.call(what, allowed, self.core.rename, *args, files=[f] + ([old] if old else []),
                        on_fail=failed)
        if old is not None:
            self._detach(old)  # README: unlinked, or replaced by a rename: never sent
        self._move(f, src, dst, before_dst)

    def _move(self, f: File, src: str, dst: str, before_dst: set, in_folder: bool = False) -> None:
        """The model's rename of one file, alone or with its folder."""
        del self.files[src]
        f.path = dst
        self.files[dst] = f
        for h in self.handles_of(f):
            h.moved = True
        self.expect(src, None)
        if in_folder and (not f.unsent() or self.kept_back(f)) and not self.open_writers(f):
            # A file moves with its folder as it is: an object by a copy, a kept-back file
            # stays kept back (PROMISE: or is sent, now that it has a final name).
            if not f.unsent():
                self.expect(dst, f.published)
            else:
                self.expect(dst, None, bytes(f.data))
                self.resolve[dst] = lambda observed, f=f: observed is not None and self._sent(f)
            return
        if temporary(dst):
            # README: a file renamed to a temporary name leaves S3 and is kept back.
            self.expect(dst, *(before_dst | {None}))
            f.published = None
            return
        f.side_effect = False  # SEMANTICS: sent if renamed (to a final name)
        if self.open_writers(f):
            # Sent at its last writer's close (which the model now requires); meanwhile S3 may
            # hold what it held, or the file's last sent content (copied).
            self.expect(dst, *(before_dst | {None, f.published}))
            f.published = None
        elif f.unsent():
            # A closed file held here (kept back) goes up under its final name now.
            self.expect(dst, bytes(f.data))
            self._sent(f)
        else:
            self.expect(dst, f.published)

    def _after_failed_rename(self, src: str, dst: str, observed, before_dst: set) -> None:
        if observed in before_dst or self.files.get(src) is None:
            self.ok[dst] = before_dst
            return
        # The copy was made: the file is under both names (and the mount shows what it made,
        # unless a file held here has the name: that one stays, and replaces it when sent).
        self.ok[dst] = {observed}
        old = self.files.get(dst)
        if old is not None and (old.unsent() or self.handles_of(old)):
            return
        if old is not None:
            self._detach(old)
        self.files[dst] = File(bytearray(observed), dst, published=observed)

    async def _rename_dir(self, src, dst, what, args):
        inside = [f for p, f in self.files.items() if p.startswith(src + "/")]
        allowed, success = set(), True
        if self.kind(dst) == "dir" and self.children(dst):
            allowed, success = {E.ENOTEMPTY}, False  # files held here count
        elif any(self.open_writers(f) or self.kept_back(f) for f in inside):
            # PROMISE not made: a folder holding a file open for writing or kept back may move
            # (its files with it) or be refused with EBUSY.
            allowed = {E.EBUSY}
        before = {k: set(v) for k, v in self.ok.items()}

        def failed(err):
            if err != E.EIO:
                return
            # Copies made before the failure may stay: every file under its old name, its
            # new one, or both (never neither).
            for f in inside:
                new = dst + f.path[len(src):]
                self.ok[new] = self.allowed(new) | self.allowed(f.path)
                self.ok[f.path] = self.allowed(f.path) | {None}
            for d in [d for d in self.dirs if d == src or d.startswith(src + "/")]:
                self.ok[dst + d[len(src):] + "/"] = self.allowed(dst + d[len(src):] + "/") | {b""}
            self.resolve[dst + "/"] = lambda observed: self._after_failed_dir_rename(src, dst, inside)

        await self.call(what, allowed, self.core.rename, *args, success=success, files=inside, on_fail=failed)
        for d in sorted(d for d in self.dirs if d == src or d.startswith(src + "/")):
            self.dirs.discard(d)
            self.dirs.add(dst + d[len(src):])
            self.expect(d + "/", None)
            self.expect(dst + d[len(src):] + "/", b"")  # SEMANTICS: folder markers made anew
        for f in sorted(inside, key=lambda f: f.path):
            new = dst + f.path[len(src):]
            self._move(f, f.path, new, before.get(new, {None}), in_folder=True)

    def _after_failed_dir_rename(self, src: str, dst: str, inside: list[File]) -> None:
        for f in inside:
            old_path, new = f.path, dst + f.path[len(src):]
            at_old, at_new = self.store.content(old_path), self.store.content(new)
            if f.unsent():
                continue  # held here: it stays where it was
            assert at_old is not None or at_new is not None, f"{old_path} is under neither name"
            self.ok[old_path], self.ok[new] = {at_old}, {at_new}
            if at_new is not None:
                self.files[new] = File(bytearray(at_new), new, published=at_new)
            if at_old is None:
                self._detach(f)
        for d in [d for d in self.dirs if d == src or d.startswith(src + "/")]:
            new = dst + d[len(src):]
            # (What the target's marker could be stays possible: one made with write-back may
            # still be on its way.)
            before = self.allowed(new + "/") if new != src else set()
            self.ok[new + "/"] = {self.store.content(new + "/")} | before
            if any(k.startswith(new + "/") for k in self.store.objects):
                self.dirs.add(new)

    @rule(path=st.sampled_from(SUBDIRS), remove=st.booleans())
    def folder(self, path, remove):
        """mkdir, or rmdir (one rule: folders matter less than files)."""
        self.step(self._rmdir if remove else self._mkdir, path)

    async def _mkdir(self, path):
        if self.unsure(path):
            return
        parent = await self.parent(path)
        if await self.look(parent, path) is not None:
            return  # EEXIST from the kernel
        allowed = set() if path.count("/") else {E.EACCES}
        await self.call(f"mkdir {path}", allowed, self.core.mkdir, parent, name_of(path).encode())
        self.dirs.add(path)
        self.expect(path + "/", b"")


    async def _rmdir(self, path):
        if self.unsure(path):
            return
        parent = await self.parent(path)
        node = await self.look(parent, path)
        if node is None or not node.is_dir:
            return  # ENOENT, ENOTDIR from the kernel
        empty = not self.children(path)  # SEMANTICS: files held here count
        await self.call(f"rmdir {path}", {E.ENOTEMPTY}, self.core.rmdir, parent, name_of(path).encode(),
                        success=empty)
        self.dirs.discard(path)
        self.expect(path + "/", None)

    # ----- rules: the world outside --------------------------------------------------------

    @rule(path=file_paths, content=st.none() | st.binary(max_size=2 * PART + 4))
    def outside(self, path, content):
        """Another program puts (or deletes: None) an object; then the listing TTL passes."""
        if content is None:
            self._outside_delete(path)
        else:
            self._outside_put(path, content)

    def _outside_put(self, path, content):
        if parent_of(path) not in self.dirs or not self.quiet(path) or path in self.dirs:
            return
        self.store.add(path, content)
        self.expect(path, content)
        if path in self.files:
            self._detach(self.files[path])
        self.files[path] = File(bytearray(content), path, published=content)
        self.step(self._ttl)

    def _outside_delete(self, path):
        if path not in self.files or not self.quiet(path):
            return
        self.store.objects.pop(path, None)
        self.expect(path, None)
        self._detach(self.files[path])
        self.step(self._ttl)

    async def _ttl(self):
        ttl_passes(self.core)

    @rule(kind=st.sampled_from([*KINDS, *PUBLISHING, "disk full", "short writes", None]), once=st.booleans())
    def fail(self, kind, once):
        """Requests of one kind fail (once, or until healed); the staging disk fills (ENOSPC)
        or its writes come back short; or everything heals (None)."""
        if kind is None:
            self.store.heal()
            if self.disk is not None:
                self.disk.mode = None
        elif kind in ("disk full", "short writes"):
            if self.disk is not None:
                self.disk.mode = "enospc" if kind == "disk full" else "short"
        else:
            (self.store.fail_once if once else self.store.failing).add(kind)

    # ----- concurrency -------------------------------------------------------------------

    @precondition(lambda self: self.descs)
    @rule(data=st.data(), other=file_paths, unlink=st.booleans())
    def rename_during_close(self, data, other, unlink):
        """A rename (or unlink) of a file arrives while its close is publishing it."""
        i = self.desc_index(data, lambda h: h.writable and h.descs == 1 and h.file.path is not None
                            and not h.file.lost and h.file.unsent() and not self.kept_back(h.file)
                            and not self.open_writers(h.file, but=h))
        if i is None:
            return
        self.step(self._rename_during_close, i, other, unlink)

    async def _rename_during_close(self, i: int, other: str, unlink: bool):
        path = self.descs[i].file.path
        if self.unsure(other):
            return
        self.store.heal()
        if self.disk is not None:
            self.disk.mode = None
        gate, closed = trio.Event(), trio.Event()
        for kind in ("put", "complete_multipart"):
            self.store.gates[kind] = gate
            self.store.arrived.pop(kind, None)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(self._part, self._close, i, False, done=closed))
                while not closed.is_set() and not self.store.arrived:
                    await trio.sleep(0)
                # SEMANTICS: a rename or unlink while a file is being published waits for it,
                # then applies to its result.
                if unlink:
                    nursery.start_soon(self._part, self._unlink, path)
                else:
                    nursery.start_soon(self._part, self._rename, path, other)
                for _ in range(20):
                    await trio.sleep(0)
                gate.set()
        finally:
            for kind in ("put", "complete_multipart"):
                self.store.gates.pop(kind, None)

    async def _part(self, afn, *args, done=None):
        try:
            await afn(*args)
        except Done:
            pass
        finally:
            if done is not None:
                done.set()

    # ----- the end --------------------------------------------------------------------------

    async def _exit_all(self):
        """Every program exits, S3 and the disk healthy: all descriptors closed, every fh released."""
        self.store.heal()
        if self.disk is not None:
            self.disk.mode = None
        while self.descs:
            await self._step(self._close, (len(self.descs) - 1, True))
        for h in list(self.unreleased):
            await self._step(self._release, (h,))

    async def _finish(self):
        """Every program exits: all descriptors closed, every fh released; then checks."""
        await self._exit_all()
        with trio.fail_after(STEP_TIMEOUT):
            left = await self.core.drain(0.2)
        # SEMANTICS: files never renamed to a final name are lost when the daemon stops, and
        # named then.
        kept = {p for p, f in self.files.items() if self.kept_back(f)}
        # (A temporary file changed back to the bytes S3 holds may be held or not.)
        maybe = {p for p, f in self.files.items() if f.changed and temporary(p)}
        assert kept <= set(left) <= kept | maybe, \
            f"drain after every file was closed: unfinished {sorted(left)}; the model: {sorted(kept)}"


@pytest.mark.timeout(1800)  # a failure's shrinking can take minutes; a passing run well under one
def test_core_matches_model(tmp_path, monkeypatch):
    set_small_parts(monkeypatch)
    CoreModel.staging_dir = str(tmp_path / "staging")
    with quiet_logs():
        run_state_machine_as_test(CoreModel, settings=settings(
            max_examples=int(os.environ.get("MODEL_EXAMPLES", 2000)), stateful_step_count=40,
            derandomize=not os.environ.get("MODEL_RANDOM"),  # see model_support.py
            deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
    if os.environ.get("MODEL_STATS"):
        from collections import Counter
        print(sorted(Counter(CALLS).items()))
