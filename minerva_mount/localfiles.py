"""The one owner of every file held locally: not yet in S3, or open while it is published.

A file is held here from the moment a program creates it or opens it for writing until its
content is in S3 and the last handle on it is released. Each held file is a `LocalFile` whose
`state` says where it stands; every transition is a method of `LocalFiles`, so the questions
"is this path held here?", "may it be sent now?", "what is in this folder?", "what is its
state?" each have one answer, asked by lookups and listings (the overlay on S3's listing),
rmdir/rename/unlink, xattrs, status and the stop drain alike.

    STREAMING --------------------.            (new file written front to back, parts going up)
        | out-of-order write      |
        v                         v
    STAGED --last writer's close--> PUBLISHING --ok--> PUBLISHED --last release--> (dropped)
      ^  |                            |     `--error--> FAILED ----last release--> (dropped)
      |  `-- close under a temporary  |
      |      name, or a file created  `-- a write, rename or unlink waits for it (`settle`)
      |      read-write never written
      |           v
      `-- write -- KEPT_BACK --renamed to a final name--> PUBLISHING

Unlinking a held file, or renaming another file over it, detaches it (DETACHED): its handles
keep working on its content, and it is never sent. `publish` is the only place that sends a
held file to S3.

With write-back, a folder made here is held too, until its marker (the empty object `dir/`)
is in S3: as the file `dir/`, spooled and uploaded as any other (`folder_made`), so `mkdir`
returns without a round trip and a crash loses no folder. Until then the folder shows from
here (`marker`, `folders_in`); a rename of it or of a folder above it sends the marker under
the new name with its copies, and rmdir deletes it; either then detaches it.
"""

import contextlib
import enum
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import trio

from .errors import MinervaError
from .namespace import is_marker, is_temporary
from .staging import Staged
from .store import ObjectInfo
from .writer import Upload

log = logging.getLogger("minerva.localfiles")


class State(enum.Enum):
    """Values are what `user.minerva.state` shows."""

    STREAMING = "uploading"  # open; written front to back, parts go up as they fill
    STAGED = "staged"  # content in a staging file, to be sent at the last writer's close
    KEPT_BACK = "kept-back"  # closed, held until renamed to a final name (or deleted)
    PUBLISHING = "publishing"  # being sent as one object (or, with write-back, being spooled)
    SPOOLED = "spooled"  # write-back: closed, durable in the local spool, uploaded in the background
    PUBLISHED = "uploaded"  # in S3; still held while a handle is open on it
    FAILED = "failed"  # the send failed; the close reported it; held while a handle is open
    DETACHED = "deleted"  # unlinked or replaced while open: never sent


UNSENT = (State.STREAMING, State.STAGED, State.KEPT_BACK, State.PUBLISHING, State.SPOOLED)


@dataclass(eq=False)
class LocalFile:
    path: str
    state: State
    upload: Upload | None = None  # the content while STREAMING
    staged: Staged | None = None  # the content otherwise
    dirty: bool = True  # differs from what S3 holds under `path`
    created_empty: bool = False  # created read-write or read-only and never written (see hold)
    writers: int = 0  # writer handles whose last close has not come yet
    opens: int = 0  # handles of any kind
    error: MinervaError | None = None
    spooled: object | None = None  # write-back: its journal (writeback.Journal) while in the spool
    aside: bool = False  # out of the table while a rename onto its name is under way
    settled: trio.Event = field(default_factory=trio.Event)  # set while not PUBLISHING
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self):
        self.settled.set()

    @property
    def size(self) -> int:
        return self.upload.size if self.upload is not None else self.staged.size

    @property
    def mtime(self) -> float | None:
        return self.upload.mtime if self.upload is not None else self.staged.mtime

    @mtime.setter
    def mtime(self, value: float) -> None:
        if self.upload is not None:
            self.upload.mtime = value
        else:
            self.staged.mtime = value

    @property
    def uploaded(self) -> int:
        return self.upload.uploaded if self.upload is not None else self.staged.uploaded

    @property
    def in_s3(self) -> ObjectInfo | None:
        """The object S3 holds under the file's name and that its content started from."""
        return self.staged.base if self.staged is not None else None

    def entry(self) -> ObjectInfo:
        """As a listing shows it."""
        base = self.in_s3
        mtime = self.mtime or (base.mtime if base else None) or time.time()
        etag = base.etag if base is not None and not self.dirty else ""
        return ObjectInfo(self.path, self.size, mtime, etag)


class LocalFiles:
    """Every held file, by path; `on_published(file, etag)` lets the core update its caches."""

    def __init__(self, nursery: trio.Nursery, on_published: Callable[[LocalFile, str], None],
                 writeback=None, on_gone: Callable[[LocalFile], None] | None = None):
        self._nursery = nursery
        self._on_gone = on_gone  # a file left the table: what the core showed of it is S3's again
        self.writeback = writeback  # writeback.WriteBack, or None: close() sends (the default)
        self._on_published = on_published
        self._by_path: dict[str, LocalFile] = {}
        self.completed = 0  # files published since the mount started
        self.idle = trio.Event()  # set while no file has content still to send (for drain)
        self.idle.set()

    # ----- questions ---------------------------------------------------------------------

    def get(self, path: str) -> LocalFile | None:
        return self._by_path.get(path)

    def __contains__(self, path: str) -> bool:
        """Whether `path` is held here: a file, or a folder whose marker is not in S3 yet."""
        return path in self._by_path or path + "/" in self._by_path

    def __iter__(self) -> Iterator[LocalFile]:
        return iter(list(self._by_path.values()))

    def marker(self, dir_path: str) -> LocalFile | None:
        """The marker of a folder made here that is not in S3 yet (write-back)."""
        return self._by_path.get(dir_path + "/")

    def in_folder(self, dir_path: str) -> list[LocalFile]:
        """The files held directly in `dir_path` (not folder markers)."""
        return [f for f in self._by_path.values()
                if f.path.rpartition("/")[0] == dir_path and not is_marker(f.path)]

    def folders_in(self, dir_path: str) -> list[str]:
        """Names of the folders in `dir_path` whose marker is held here."""
        return [f.path[:-1].rpartition("/")[2] for f in self._by_path.values()
                if is_marker(f.path) and f.path[:-1].rpartition("/")[0] == dir_path]

    def under(self, dir_path: str) -> list[LocalFile]:
        """Everything held below `dir_path`, its own marker too (what moves with it)."""
        return [f for f in self._by_path.values() if f.path.startswith(dir_path + "/")]

    def inside(self, dir_path: str) -> list[LocalFile]:
        """What makes `dir_path` not empty: `under` but for its own marker."""
        return [f for f in self.under(dir_path) if f.path != dir_path + "/"]

    def state_of(self, path: str) -> State | None:
        f = self._by_path.get(path)
        return f.state if f is not None else None

    def unfinished(self) -> list[LocalFile]:
        """Files whose content is not (all) in S3: what a stop must wait for or name."""
        return [f for f in self._by_path.values() if f.state in UNSENT or f.state is State.FAILED]

    def in_progress(self) -> list[LocalFile]:
        """Files on their way to S3 (what `unmount` and `sync` wait for): not kept-back or
        failed ones, which wait for the user."""
        return [f for f in self._by_path.values() if self._on_the_way(f)]

    @staticmethod
    def _on_the_way(f: LocalFile) -> bool:
        return (f.state in (State.STREAMING, State.PUBLISHING, State.SPOOLED)
                or (f.state is State.STAGED and f.dirty))

    def spooled(self) -> list[LocalFile]:
        return [f for f in self._by_path.values() if f.state is State.SPOOLED]

    # ----- transitions -------------------------------------------------------------------

    def _add(self, f: LocalFile) -> LocalFile:
        old = self._by_path.get(f.path)
        if old is not None:
            self.detach(old)
        self._by_path[f.path] = f
        self._update_idle()
        return f

    def streaming(self, path: str, upload: Upload) -> LocalFile:
        return self._add(LocalFile(path, State.STREAMING, upload=upload))

    def staged(self, path: str, staged: Staged, *, dirty: bool) -> LocalFile:
        return self._add(LocalFile(path, State.STAGED, staged=staged, dirty=dirty))

    async def folder_made(self, dir_path: str, staged: Staged) -> None:
        """Write-back: the folder's marker is spooled (durable when this returns)."""
        f = self._add(LocalFile(dir_path + "/", State.STAGED, staged=staged))
        try:
            await self.publish(f)
        except MinervaError:
            self._drop(f)
            raise

    def restaged(self, f: LocalFile, staged: Staged) -> None:
        """STREAMING -> STAGED: a new file stopped being sequential before a part was sent."""
        assert f.state in (State.STREAMING, State.DETACHED) and f.upload is not None
        f.upload, f.staged = None, staged
        if f.state is State.STREAMING:
            f.state = State.STAGED
        self._update_idle()

    def opened(self, f: LocalFile, writer: bool) -> None:
        f.opens += 1
        if writer:
            f.writers += 1
            if f.state in (State.KEPT_BACK, State.PUBLISHED, State.FAILED, State.SPOOLED):
                # (A spooled version stays in the spool until the next close makes a newer
                # one durable: a crash meanwhile sends the last closed one; see before_change.)
                f.state, f.error = State.STAGED, None
        self._update_idle()

    def unsent(self, f: LocalFile) -> None:
        """S3 no longer holds the content under the file's name (renamed away from its object):
        it must be sent, or kept back, even if unchanged."""
        f.dirty = True
        self._update_idle()

    def restore(self, f: LocalFile, state: State, dirty: bool, created_empty: bool) -> None:
        """Back to where a refused call found it (a truncate whose publish failed, undone)."""
        f.state, f.dirty, f.created_empty, f.error = state, dirty, created_empty, None
        self._update_idle()

    def side_effect(self, f: LocalFile) -> None:
        """Created without the intent to write it: kept back unless written, truncated or renamed."""
        f.created_empty = True

    def wanted(self, f: LocalFile) -> None:
        """Opened to be written anew: sent at its close even if empty."""
        f.created_empty = False

    def discard(self, f: LocalFile) -> None:
        """A held copy made for a call that failed: gone, as if the call had not been made."""
        self._drop(f)

    def writing_again(self, f: LocalFile) -> None:
        """A handle whose close was taken as its last writes again (a copy we could not see)."""
        f.writers += 1
        self.changed(f)

    def changed(self, f: LocalFile) -> None:
        """Content written or truncated: it differs from S3 now, and its mtime is now (as on
        a local disk; kept until sent, so `stat` shows one mtime per content)."""
        before = (f.state, f.dirty)
        f.dirty, f.created_empty = True, False
        f.mtime = time.time()
        if f.state in (State.PUBLISHED, State.FAILED, State.KEPT_BACK, State.SPOOLED):
            f.state, f.error = State.STAGED, None  # (a spooled version stays: see before_change)
        if (f.state, f.dirty) != before:  # every write comes here: scan the table only on a change
            self._update_idle()

    def writer_closed(self, f: LocalFile) -> bool:
        """A writer handle's last close: whether the file should be published now."""
        f.writers -= 1
        return f.writers == 0 and f.state in (State.STREAMING, State.STAGED)

    def released(self, f: LocalFile) -> bool:
        """A handle is gone: drops the file after the last one, unless content waits to be
        sent. Returns whether it should be published now (a writer that never flushed)."""
        f.opens -= 1
        if f.opens > 0:
            return False
        if f.state is State.STAGED and f.writers == 0:
            return True
        if f.state in (State.PUBLISHED, State.DETACHED) or (f.state is State.FAILED and f.spooled is None):
            self._drop(f)
        return False

    def set_aside(self, f: LocalFile) -> None:
        """A rename onto `f`'s name is under way: out of the table, untouched, until the
        rename is done (`detach`) or refused (`put_back`)."""
        if self._by_path.get(f.path) is f:
            del self._by_path[f.path]
            f.aside = True

    def put_back(self, f: LocalFile) -> None:
        f.aside = False
        self._by_path[f.path] = f
        if f.state is State.SPOOLED:  # its upload task found it aside and ended
            self.writeback.queue(f)

    def detach(self, f: LocalFile) -> None:
        """Unlinked, or replaced by a rename: never sent; content freed after its last handle."""
        if self._by_path.get(f.path) is f or f.aside:
            if not f.aside:
                del self._by_path[f.path]
            f.aside = False
            self._gone(f)
        f.state = State.DETACHED
        self._unspool(f)
        if f.opens == 0:
            self._free(f)
        self._update_idle()

    def renamed(self, f: LocalFile, dst: str) -> None:
        """The file takes a new name locally (nothing is sent by this)."""
        old = self._by_path.get(dst)
        if old is not None and old is not f:
            self.detach(old)
        del self._by_path[f.path]
        f.path = dst
        if not is_temporary(dst):
            f.created_empty = False  # given a final name: a file the user wants there
        if f.upload is not None:
            f.upload.path = dst
        if f.staged is not None:
            f.staged.path = dst
        self._by_path[dst] = f
        if f.spooled is not None and is_temporary(dst):
            # A temporary name never reaches S3: out of the spool, kept back until renamed to a
            # final name (then spooled again), as a file closed under that name would be.
            self._unspool(f)
            f.state, f.error = State.KEPT_BACK, None
            self._update_idle()
        elif f.spooled is not None:
            self.writeback.renamed(f)

    async def settle(self, f: LocalFile) -> None:
        """Wait while the file is being published or renamed (renames, unlinks and uploads
        are ordered after it). Returns at once, without a checkpoint, if it is neither: the
        caller's next step then happens before any other task's."""
        while not f.settled.is_set():
            await f.settled.wait()

    @contextlib.asynccontextmanager
    async def changing(self, f: LocalFile):
        """A rename or unlink of `f` under way: no upload of it starts meanwhile (one that had
        started is waited for first). Without this an upload started while the rename waited
        for S3 went out under the old name (WB1). Nothing inside may wait for `f` to settle."""
        await self.settle(f)
        f.settled = trio.Event()
        try:
            yield
        finally:
            f.settled.set()

    async def before_change(self, f: LocalFile) -> None:
        """Called before the content of a held file is written or truncated. A file whose
        last closed version is in the write-back spool as its staging file itself goes on in
        a copy: that version stays whole for a crash to send, until the next close makes the
        new one durable (WB4, WB8)."""
        await self.settle(f)
        if f.spooled is not None and f.spooled.linked:
            await f.staged.fork()
            f.spooled.linked = False

    async def publish(self, f: LocalFile) -> None:
        """The one place that sends a held file: as one object, under its name, once.

        A temporary name, or a file created without being opened for writing and never
        written, is kept back instead (sent when renamed to a final name, or written).
        """
        await self.settle(f)
        if f.state not in (State.STREAMING, State.STAGED, State.KEPT_BACK) or self.get(f.path) is not f:
            return
        if not f.dirty:  # nothing to send (also under a temporary name: nothing to hold)
            f.state = State.PUBLISHED
            self._after_send(f)
            return
        if is_temporary(f.path) or f.created_empty:
            self._keep_back(f)
            return
        f.state, f.settled = State.PUBLISHING, trio.Event()
        if self.writeback is not None and f.upload is None:
            await self._spool(f)
            return
        try:
            if f.upload is not None:
                etag = await f.upload.finish()
            else:
                if f.staged.mtime is None:  # new and never written
                    f.staged.mtime = time.time()
                etag = await f.staged.upload(f.path, self._nursery)
        except MinervaError as exc:
            log.error("upload of %s failed: %s", f.path, exc)
            f.state, f.error = State.FAILED, exc
            if f.upload is not None:
                f.state = State.DETACHED  # streamed parts cannot be sent again: nothing to keep
                self.detach(f)
            raise
        finally:
            f.settled.set()
            self._update_idle()
        if f.state is State.PUBLISHING:
            f.state, f.dirty = State.PUBLISHED, False
            self.completed += 1
            self._on_published(f, etag)
        self._after_send(f)

    async def _spool(self, f: LocalFile) -> None:
        """Write-back: the close returns once the file is durable in the spool."""
        try:
            await self.writeback.make_durable(f)
        except (MinervaError, OSError) as exc:
            log.error("%s could not be written to the spool: %s", f.path, exc)
            f.state, f.error = State.FAILED, exc
            raise exc if isinstance(exc, MinervaError) else MinervaError(f"{f.path}: spool: {exc}") from None
        finally:
            f.settled.set()
            self._update_idle()
        f.state = State.SPOOLED
        self._update_idle()
        # (DEBUG: at INFO, formatting and writing this line was 0.04 ms of each close's ~1 ms
        # in a copy of small files; "uploaded ..." follows at INFO.)
        log.debug("spooled %s (%d bytes): uploaded in the background", f.path, f.size)

    async def send_spooled(self, f: LocalFile) -> None:
        """Write-back's background upload of a spooled file (writeback.WriteBack._upload)."""
        await self.settle(f)
        if f.state is not State.SPOOLED or self.get(f.path) is not f:
            return
        f.state, f.settled = State.PUBLISHING, trio.Event()
        try:
            etag = await f.staged.upload(f.path, self._nursery, journal=f.spooled)
            await self.writeback.uploaded(f)
        except MinervaError:
            if f.state is State.PUBLISHING:
                f.state = State.SPOOLED
            raise
        finally:
            f.settled.set()
            self._update_idle()
        f.state, f.dirty = State.PUBLISHED, False
        self.completed += 1
        self._on_published(f, etag)
        self._unspool(f)
        self._after_send(f)

    def spool_failed(self, f: LocalFile, exc: MinervaError) -> None:
        """An upload that cannot succeed: kept in the spool (retried at the next start)."""
        f.state, f.error = State.FAILED, exc
        if f.spooled is not None:
            f.spooled.failed = str(exc)
            self.writeback.failed(f)
        self._update_idle()

    def restored(self, path: str, staged: Staged, journal) -> LocalFile:
        """A spooled file an earlier run left: held again, to be uploaded first (one that
        failed for good then is tried again: the cause, such as a revoked key, may be gone)."""
        journal.failed = None
        return self._add(LocalFile(path, State.SPOOLED, staged=staged, dirty=True, spooled=journal))

    def _gone(self, f: LocalFile) -> None:
        if self._on_gone is not None:
            self._on_gone(f)

    def _unspool(self, f: LocalFile) -> None:
        if f.spooled is not None:
            self.writeback.forget(f)

    def _keep_back(self, f: LocalFile) -> None:
        if f.upload is not None:
            raise AssertionError(f"{f.path}: streamed files are never kept back")
        f.state = State.KEPT_BACK
        why = "a temporary name" if is_temporary(f.path) else "created and never written"
        log.info("kept back %s (%s): sent once renamed to a final name", f.path, why)
        self._update_idle()

    def _after_send(self, f: LocalFile) -> None:
        if f.opens == 0 and f.writers == 0 and self.get(f.path) is f:
            self._drop(f)
        self._update_idle()

    def dropped_failed(self, f: LocalFile) -> None:
        """A failed file with no handle: its content is given up (the close reported it)."""
        self._drop(f)

    def _drop(self, f: LocalFile) -> None:
        if self._by_path.get(f.path) is f:
            del self._by_path[f.path]
            self._gone(f)
        self._unspool(f)
        self._free(f)
        self._update_idle()

    @staticmethod
    def _free(f: LocalFile) -> None:
        if f.staged is not None:
            f.staged.close()

    def _update_idle(self) -> None:
        busy = any(self._on_the_way(f) for f in self._by_path.values())
        if busy and self.idle.is_set():
            self.idle = trio.Event()
        elif not busy:
            self.idle.set()
