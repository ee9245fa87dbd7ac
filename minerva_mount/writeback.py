"""Write-back (`--write-back`): close() returns once the file is durable on local disk.

Far from the region every upload costs round trips the application waits for at close (at
40 ms RTT, ~100 ms per small file); a desktop copy of a folder pays that per file. With
write-back, the last close links the file's staging copy into the spool folder, fsyncs it
and its journal, and returns; the files are uploaded in the background, several at once,
each still appearing in S3 whole and once under its final name (renames and deletes before
the upload are applied to the spool).

The spool is a folder of our own (safepaths.py) under the cache folder. Per file:
- `ID.data`: the content (the staging file itself, linked into the folder: no copy), 0600;
- `ID.json`: the journal: key, size, mtime, and for a multipart upload its upload id and the
  ETag of every part S3 acknowledged, written to a temporary name, fsync'd and renamed, so a
  crash leaves either the old journal or the new one, never half of one.
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
import os
import time
from dataclasses import asdict, dataclass, field

import trio

from .errors import MinervaError

log = logging.getLogger("minerva.writeback")

CONCURRENT_UPLOADS = 4  # files uploaded at once (each a PUT, or up to 8 parts in flight)
RETRY_FIRST, RETRY_MAX = 1.0, 60.0  # backoff of a failed background upload, seconds
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

    def write_journal(self, journal: Journal) -> None:
        data = {k: v for k, v in asdict(journal).items() if k != "spool"}
        tmp = f"{journal.id}.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600, dir_fd=self.fd)
        try:
            os.write(fd, json.dumps(data).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, f"{journal.id}.json", src_dir_fd=self.fd, dst_dir_fd=self.fd)
        os.fsync(self.fd)

    def add(self, content_fd: int, key: str, size: int, mtime: float) -> Journal:
        """Make the content durable under a new id, then its journal (in that order: a
        journal never names data that is not on disk)."""
        journal = Journal(os.urandom(8).hex(), key, size, mtime, spool=self)
        name = f"{journal.id}.data"
        try:
            os.link(f"/proc/self/fd/{content_fd}", name, dst_dir_fd=self.fd, follow_symlinks=True)
        except OSError:  # not an O_TMPFILE file (a file system without it): copy instead
            self._copy(content_fd, name, size)
        os.fsync(content_fd)
        journal.save()
        self.used += size
        return journal

    def _copy(self, content_fd: int, name: str, size: int) -> None:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=self.fd)
        try:
            offset = 0
            while offset < size:
                sent = os.copy_file_range(content_fd, fd, size - offset, offset, offset)
                if sent <= 0:
                    raise OSError(errno.EIO, "short copy into the spool")
                offset += sent
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove(self, journal: Journal) -> None:
        """The file is in S3 (or deleted): journal first, so no journal names missing data."""
        for name in (f"{journal.id}.json", f"{journal.id}.data"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self.fd)
        os.fsync(self.fd)
        self.used = max(self.used - journal.size, 0)
        self.room.set()
        self.room = trio.Event()

    def scan(self) -> list[tuple[Journal, int]]:
        """What an earlier run left: (journal, content fd) for each whole entry; the rest
        (a data file without its journal: the crash came between the two) is removed."""
        names = set(os.listdir(self.fd))
        found = []
        for name in sorted(names):
            if name.endswith(".json.tmp") or (name.endswith(".data") and name[:-5] + ".json" not in names):
                os.unlink(name, dir_fd=self.fd)
                continue
            if not name.endswith(".json"):
                continue
            try:
                journal = self._read_journal(name)
                fd = os.open(f"{journal.id}.data", os.O_RDWR | os.O_NOFOLLOW, dir_fd=self.fd)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("spool entry %s unusable, left in place: %s", name, exc)
                continue
            st = os.fstat(fd)
            if st.st_uid != os.geteuid() or st.st_mode & 0o077 or st.st_size != journal.size:
                log.error("spool entry %s is not ours or not whole; left in place", name)
                os.close(fd)
                continue
            self.used += journal.size
            found.append((journal, fd))
        return found

    def _read_journal(self, name: str) -> Journal:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=self.fd)
        try:
            data = json.loads(os.read(fd, 1 << 20))
        finally:
            os.close(fd)
        data["parts"] = {int(k): v for k, v in data.get("parts", {}).items()}
        return Journal(**data, spool=self)


class WriteBack:
    """The spool and its uploader (a task of the daemon's nursery, see `run`)."""

    def __init__(self, spool: Spool):
        self.spool = spool
        self._wake = trio.Event()
        self._limiter = trio.CapacityLimiter(CONCURRENT_UPLOADS)
        self._active: set[int] = set()
        self.files = None

    async def make_durable(self, f) -> None:
        """The last close of `f` (localfiles.LocalFiles.publish): spool it, waiting for room."""
        staged = f.staged
        await staged.fill_all()  # every byte local: the object it started from may change
        while self.spool.used and self.spool.used + staged.size > self.spool.cap:
            log.info("spool full (%d of %d bytes): %s waits for uploads to make room",
                     self.spool.used, self.spool.cap, f.path)
            await self.spool.room.wait()
        if staged.mtime is None:
            staged.mtime = time.time()
        f.spooled = await trio.to_thread.run_sync(
            self.spool.add, staged.fd, f.path, staged.size, staged.mtime)
        self.wake()

    def renamed(self, f) -> None:
        """A spooled file took a new name before its upload: the journal follows (an upload
        begun under the old key is started again under the new one)."""
        f.spooled.key, f.spooled.upload_id, f.spooled.parts = f.path, None, {}
        f.spooled.save()

    def forget(self, f) -> None:
        if f.spooled is not None:
            self.spool.remove(f.spooled)
            f.spooled = None

    def wake(self) -> None:
        self._wake.set()

    async def run(self, files, restore, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Restore what an earlier run left (`restore(journal, fd)` makes it a held file),
        then upload spooled files as they come, CONCURRENT_UPLOADS at a time."""
        self.files = files
        entries = self.spool.scan()
        for journal, fd in entries:
            restore(journal, fd)
        if entries:
            log.info("write-back: %d files (%d bytes) left by an earlier run, uploading them first",
                     len(entries), sum(j.size for j, _ in entries))
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                for f in files.spooled():
                    if id(f) not in self._active:
                        self._active.add(id(f))
                        nursery.start_soon(self._upload, f)
                await self._wake.wait()
                self._wake = trio.Event()

    async def _upload(self, f) -> None:
        delay = RETRY_FIRST
        try:
            async with self._limiter:
                while f.spooled is not None and f.spooled.failed is None:
                    try:
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
                    await trio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)
        finally:
            self._active.discard(id(f))
