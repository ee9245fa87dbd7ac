"""Write-back (`--write-back`): close() returns once the file is durable on local disk.

Far from the region every upload costs round trips the application waits for at close (at
40 ms RTT, ~100 ms per small file); a desktop copy of a folder pays that per file. With
write-back, the last close links the file's staging copy into the spool folder, fsyncs it
and its journal, and returns; the files are uploaded in the background, several at once,
each still appearing in S3 whole and once under its final name (renames and deletes before
the upload are applied to the spool).

The spool is a folder of our own (safepaths.py) under the cache folder. Per file:
- `ID.data`: the content (the staging file itself, linked into the folder: no copy), 0600;
- its journal: key, size, mtime, and for a multipart upload its upload id and the ETag of
  every part S3 acknowledged. The first one is an extended attribute of `ID.data`, so one
  fsync of the file makes content and journal durable together: a close costs 0.37 ms of
  disk work here instead of 0.84 with a journal file of its own (three fsyncs), and it is
  most of what a close costs. Later ones (a rename, a multipart upload's parts) and any on a
  file system without user xattrs go to `ID.json`: written to a temporary name, fsync'd and
  renamed, so a crash leaves either the old journal or the new one, never half of one. A
  `ID.json` overrides the attribute.
A folder made here (mkdir) is spooled the same way, as its marker: the empty object `dir/`
(localfiles.LocalFiles.folder_made), so a `cp -r` does not wait a round trip for it.
Nothing is lost: after a SIGKILL, a crash or a reboot the next start finds the spool and
uploads it before anything else, resuming a multipart upload from its journaled parts (the
policy allows no ListParts). A transient failure is retried with backoff (1 s doubling to
60 s); one that cannot succeed (403, a key S3 refuses) stays in the spool as `failed` and is
retried at the next start. The spool has a cap (`spool_size`, 4 GiB by default): a close
that would pass it waits for uploads to make room (never fails for it).
"""

import contextlib
import errno
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field

import trio

from .errors import MinervaError
from .staging import copy_all

log = logging.getLogger("minerva.writeback")

# Files uploaded at once. Far away a small file's PUT is one round trip of waiting and ~1 ms
# of CPU: at 40 ms RTT, 200 files of 16 KiB took 2.7 s four at a time and 0.9 s sixteen at a
# time (bench/wan.py). Larger files (up to 8 MiB read whole, or up to 8 parts of 8 MiB in
# flight each) are limited by bytes held, not by waiting: four at a time.
SMALL_FILE = 1 << 20
CONCURRENT_SMALL, CONCURRENT_LARGE = 16, 4
# But each upload also costs the daemon ~1 ms of CPU under the one GIL that serves the file
# system, and the proxy and S3 CPU on the same 2 cores: sixteen at once while `cp -r` was
# still closing files made the copy 0.86 s instead of 0.5, and even two at once cost each
# close ~0.2 ms (flush 0.92 ms instead of 0.73, create 0.38 instead of 0.22). So while closes
# come less than BURST_GAP apart (a copy in progress: ~1.5 ms apart for small files), the
# first BURST_HOLD seconds of it upload nothing, and then BURST_WIDTH small files at a time;
# all follow at full width once the copy pauses. A desktop copy of a few hundred small files
# is over before any upload starts (200 x 16 KiB at 40 ms RTT, alternate runs beside rclone:
# `cp` returned in 0.31 s instead of 0.38, and all were in S3 after 1.13 s instead of 1.22,
# since they then go sixteen at a time); a long copy still uploads as it goes, two at a time.
BURST_GAP, BURST_HOLD, BURST_WIDTH = 0.05, 1.0, 2
RETRY_FIRST, RETRY_MAX = 1.0, 60.0  # backoff of a failed background upload, seconds
JOURNAL_XATTR = "user.minerva.journal"
SAVED = ("id", "key", "size", "mtime", "upload_id", "parts", "failed")  # what a journal holds
PERMANENT = {errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.EFBIG, errno.EINVAL}


@dataclass
class Journal:
    """What survives a crash of one spooled file; written whole at every change."""

    id: str
    key: str
    size: int
    mtime: float
    upload_id: str | None = None
    parts: dict[int, str] = field(default_factory=dict)
    failed: str | None = None
    spool: "Spool | None" = field(default=None, repr=False, compare=False)
    counted: bool = field(default=True, repr=False, compare=False)  # in Spool.used
    linked: bool = field(default=False, repr=False, compare=False)  # the data file is the staging file

    def started(self, upload_id: str) -> None:
        self.upload_id, self.parts = upload_id, {}
        self.save()

    def part_done(self, number: int, etag: str) -> None:
        self.parts[number] = etag
        self.save()

    def save(self) -> None:
        if self.spool is not None:
            self.spool.write_journal(self)


class Spool:
    """The spool folder: durable files and their journals; counts the bytes it holds."""

    def __init__(self, folder_fd: int, cap: int):
        self.fd = folder_fd
        self.cap = cap
        self.used = 0
        self.room = trio.Event()  # set whenever bytes leave the spool
        self.xattrs = True  # journals in an xattr of the data file; False once refused

    def write_journal(self, journal: Journal) -> None:
        """A journal that replaces an earlier one: `ID.json`, atomically."""
        tmp = f"{journal.id}.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600, dir_fd=self.fd)
        try:
            os.write(fd, _encoded(journal))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, f"{journal.id}.json", src_dir_fd=self.fd, dst_dir_fd=self.fd)
        os.fsync(self.fd)

    def add(self, content_fd: int, key: str, size: int, mtime: float) -> Journal:
        """Make the content and its journal durable under a new id. A crash before this
        returns may leave the data without a journal (the close had not returned: nothing
        was promised); `scan` removes it."""
        journal = Journal(os.urandom(8).hex(), key, size, mtime, spool=self)
        name = f"{journal.id}.data"
        data_fd = content_fd
        try:
            os.link(f"/proc/self/fd/{content_fd}", name, dst_dir_fd=self.fd, follow_symlinks=True)
        except OSError:  # no O_TMPFILE here, or one linked before (Linux links those once): a copy
            data_fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=self.fd)
        try:
            if data_fd != content_fd:
                copy_all(content_fd, data_fd, size)
            if self.xattrs:
                try:
                    os.setxattr(data_fd, JOURNAL_XATTR, _encoded(journal))
                except OSError as exc:
                    if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.E2BIG, errno.ENOSPC):
                        raise
                    log.info("spool: no extended attributes here (%s); journals go to files", exc.strerror)
                    self.xattrs = False
            os.fsync(data_fd)
        finally:
            if data_fd != content_fd:
                os.close(data_fd)
        if not self.xattrs:
            self.write_journal(journal)
        else:
            os.fsync(self.fd)  # the name
        self.used += size
        journal.linked = data_fd == content_fd
        return journal

    def remove(self, journal: Journal) -> None:
        """The file is in S3 (or deleted): journal first, so no journal names missing data.
        Only files: callable from a worker thread (`freed` does the accounting)."""
        for name in (f"{journal.id}.json", f"{journal.id}.data"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self.fd)
        os.fsync(self.fd)

    def freed(self, journal: Journal) -> None:
        """Its bytes no longer count toward the cap (gone, or failed for good: those wait for
        the next start, and a close must not wait for them for ever)."""
        if journal.counted:
            journal.counted = False
            self.used = max(self.used - journal.size, 0)
            self.room.set()
            self.room = trio.Event()

    def scan(self) -> list[tuple[Journal, int]]:
        """What an earlier run left: (journal, content fd) for each whole entry; the rest
        (a data file without a journal: the crash came before its close returned) is removed."""
        names = set(os.listdir(self.fd))
        found = []
        for name in sorted(names):
            if name.endswith(".json.tmp") or (name.endswith(".json") and name[:-5] + ".data" not in names):
                os.unlink(name, dir_fd=self.fd)
                continue
            if not name.endswith(".data"):
                continue
            try:
                fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW, dir_fd=self.fd)
            except OSError as exc:
                log.error("spool entry %s unusable, left in place: %s", name, exc)
                continue
            try:
                journal = self._read_journal(name[:-5], fd, name[:-5] + ".json" in names)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("spool entry %s unusable, left in place: %s", name, exc)
                os.close(fd)
                continue
            if journal is None:
                log.info("spool: %s has no journal (a crash came before its close returned); removed", name)
                os.close(fd)
                os.unlink(name, dir_fd=self.fd)
                continue
            st = os.fstat(fd)
            if st.st_uid != os.geteuid() or st.st_mode & 0o077 or st.st_size != journal.size:
                log.error("spool entry %s is not ours or not whole; left in place", name)
                os.close(fd)
                continue
            self.used += journal.size
            journal.linked = True  # the held file's content is this data file
            found.append((journal, fd))
        return found

    def _read_journal(self, entry: str, data_fd: int, has_file: bool) -> Journal | None:
        if has_file:
            fd = os.open(f"{entry}.json", os.O_RDONLY | os.O_NOFOLLOW, dir_fd=self.fd)
            try:
                raw = os.read(fd, 1 << 24)
            finally:
                os.close(fd)
        else:
            try:
                raw = os.getxattr(data_fd, JOURNAL_XATTR)
            except OSError as exc:
                if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
                    return None
                raise
        data = json.loads(raw)
        data["parts"] = {int(k): v for k, v in data.get("parts", {}).items()}
        journal = Journal(**data, spool=self)
        if journal.id != entry:
            raise ValueError(f"journal of {journal.id} found in entry {entry}")
        return journal


def _encoded(journal: Journal) -> bytes:
    return json.dumps({k: getattr(journal, k) for k in SAVED}).encode()


class WriteBack:
    """The spool and its uploader (a task of the daemon's nursery, see `run`)."""

    def __init__(self, spool: Spool):
        self.spool = spool
        self._wake = trio.Event()
        self._small = trio.CapacityLimiter(CONCURRENT_SMALL)
        self._large = trio.CapacityLimiter(CONCURRENT_LARGE)
        self._active: set[int] = set()
        self._pending: list = []  # spooled files to start an upload for (at most the spool's)
        self._last_spooled = -math.inf  # trio time of the last close that spooled a file
        self._burst_began = -math.inf  # trio time of the first close of the current burst
        self.files = None

    async def make_durable(self, f) -> None:
        """The last close of `f` (localfiles.LocalFiles.publish): spool it, waiting for room."""
        staged = f.staged
        await staged.fill_all()  # every byte local: the object it started from may change
        older = f.spooled  # the last closed version, kept while this one was written
        # (Nothing of size 0 waits: an empty file or a folder's marker takes no room, WB13.)
        while staged.size and self.spool.used and self._used_besides(older) + staged.size > self.spool.cap:
            log.info("spool full (%d of %d bytes): %s waits for uploads to make room",
                     self.spool.used, self.spool.cap, f.path)
            await self.spool.room.wait()
        if staged.mtime is None:
            staged.mtime = time.time()
        f.spooled = await trio.to_thread.run_sync(
            self.spool.add, staged.fd, f.path, staged.size, staged.mtime)
        if older is not None:  # superseded: the new version is durable
            try:
                self.spool.remove(older)
            except OSError as exc:  # the close succeeded; the next start may send it too (whole)
                log.error("superseded spool entry %s of %s not removed: %s", older.id, f.path, exc)
            self.spool.freed(older)
        now = trio.current_time()
        if now >= self._last_spooled + BURST_GAP:
            self._burst_began = now
        self._last_spooled = now
        self._small.total_tokens = self._width(now)
        self.queue(f)

    def queue(self, f) -> None:
        """`f` is spooled and needs an upload (a task is started unless one is running)."""
        self._pending.append(f)
        self.wake()

    def _used_besides(self, journal) -> int:
        return self.spool.used - (journal.size if journal is not None and journal.counted else 0)

    def renamed(self, f) -> None:
        """A spooled file took a new name before its upload: the journal follows (an upload
        begun under the old key is started again under the new one)."""
        f.spooled.key, f.spooled.upload_id, f.spooled.parts = f.path, None, {}
        f.spooled.save()

    def forget(self, f) -> None:
        """The file leaves the spool before its upload (deleted, or renamed to a temporary
        name): at once."""
        if f.spooled is not None:
            journal, f.spooled = f.spooled, None
            self.spool.remove(journal)
            self.spool.freed(journal)

    def failed(self, f) -> None:
        """Its upload cannot succeed: kept in the spool (tried again at the next start)."""
        f.spooled.save()
        self.spool.freed(f.spooled)

    async def uploaded(self, f) -> None:
        """The file is in S3: its entry goes, off the event loop (0.3 ms of unlinks and an
        fsync per file, which a copy in progress would otherwise wait for). Called while the
        file is still PUBLISHING, so nothing writes to it until the entry is gone."""
        journal, f.spooled = f.spooled, None
        if journal is None:
            return
        try:
            await trio.to_thread.run_sync(self.spool.remove, journal)
        except OSError as exc:  # it would be sent again at the next start: a duplicate, whole
            log.error("spool entry of %s (%s) could not be removed: %s", f.path, journal.id, exc)
        self.spool.freed(journal)

    def wake(self) -> None:
        self._wake.set()

    def _width(self, now: float) -> int:
        """Small files uploaded at once now (see BURST_HOLD): the one place that decides."""
        if now >= self._last_spooled + BURST_GAP:
            return CONCURRENT_SMALL  # no copy in progress
        return 0 if now < self._burst_began + BURST_HOLD else BURST_WIDTH

    def _width_changes_at(self, now: float) -> float:
        """When `_width` next changes with no new close (math.inf: not without one)."""
        if now >= self._last_spooled + BURST_GAP:
            return math.inf
        hold_ends, burst_ends = self._burst_began + BURST_HOLD, self._last_spooled + BURST_GAP
        return min(hold_ends, burst_ends) if now < hold_ends else burst_ends

    async def run(self, files, restore, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Restore what an earlier run left (`restore(journal, fd)` makes it a held file),
        then upload spooled files as they come, several at a time."""
        self.files = files
        entries = self.spool.scan()
        for journal, fd in entries:
            restore(journal, fd)
        if entries:
            log.info("write-back: %d files (%d bytes) left by an earlier run, uploading them first",
                     len(entries), sum(j.size for j, _ in entries))
        self._pending.extend(files.spooled())
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                pending, self._pending = self._pending, []
                for f in pending:
                    if id(f) not in self._active:
                        self._active.add(id(f))
                        nursery.start_soon(self._upload, f)
                now = trio.current_time()
                self._small.total_tokens = self._width(now)
                with trio.move_on_at(self._width_changes_at(now)):
                    await self._wake.wait()
                    self._wake = trio.Event()

    async def _upload(self, f) -> None:
        """Upload `f`, retrying with backoff. A slot of the limiter is held per attempt, not
        across the backoff: two failing files held both slots of a copy in progress, and no
        other file went up for its whole length (WB18)."""
        delay = RETRY_FIRST
        limiter = self._small if f.size < SMALL_FILE else self._large
        try:
            while f.spooled is not None and f.spooled.failed is None:
                try:
                    async with limiter:
                        await self.files.send_spooled(f)
                    return
                except MinervaError as exc:
                    if exc.errno in PERMANENT:
                        log.error("write-back of %s failed for good, kept in the spool: %s", f.path, exc)
                        self.files.spool_failed(f, exc)
                        return
                    if exc.errno == errno.ENOENT and f.spooled is not None and f.spooled.upload_id:
                        f.spooled.upload_id, f.spooled.parts = None, {}  # the upload is gone
                    log.warning("write-back of %s failed, retrying in %.0f s: %s", f.path, delay, exc)
                except Exception as exc:  # a bug: this file waits for the next start, the mount goes on
                    log.exception("write-back of %s failed unexpectedly; kept in the spool", f.path)
                    why = MinervaError(f"{f.path}: internal error ({type(exc).__name__})")
                    self.files.spool_failed(f, why)
                    return
                await trio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
        finally:
            self._active.discard(id(f))
