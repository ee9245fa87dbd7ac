"""The write-back model's machine (test_core_model_writeback.py has its rules and says what
it checks): CoreModel over wb_support.Daemon, a MockClock that moves only when told (or while
a step waits on time alone), S3 compared with `ok` at drains and with `seen` in between.
"""

import contextlib
import math

import trio
import trio.testing
from test_core_model import CoreModel, Done, File, temporary
from wb_support import Daemon, example_folder, remove_folder, seed_scheduler

from minerva_mount.localfiles import State

UPLOADS = ("put", "create_multipart", "upload_part", "complete_multipart")
STEP_TIMEOUT = 7200.0  # trio seconds: the clock jumps only while a step waits on time alone


def background(kind: str, keys: tuple[str, ...]) -> bool:
    """A request only the uploader makes with write-back: one sending a file's content."""
    return kind.split()[0] in UPLOADS and bool(keys) and not keys[-1].endswith("/")


class WriteBackModel(CoreModel):
    staging_dir = None  # wb_support.example_folder() per example

    def __init__(self):
        self.folder = example_folder()
        self.clock = trio.testing.MockClock()  # autojump off: time passes when the model says
        # key -> every content `ok` allowed since the last drain (a key not there: None)
        self.seen: dict[str, set] = {}
        self.strict = False  # the check after this step: S3 holds exactly what `ok` allows
        self.rebuild = False  # after a crash and a drain: the model's files are S3's objects
        self.refusals_before = 0  # staging-disk refusals of daemons that crashed
        self.daemon = None
        self.schedule = 0  # seeds trio's scheduler at every step (the `reshuffle` rule)
        super().__init__()

    async def _make_core(self, nursery):
        self.daemon = Daemon(self.store, self.folder,
                             still_open=lambda fh: fh in self.fhs and self.fhs[fh].descs > 0)
        core = await self.daemon.start(nursery)
        self.disk = self.daemon.disk
        return core

    def teardown(self):
        try:
            super().teardown()
        finally:
            remove_folder(self.folder)

    def faults(self) -> int:
        """Failures a program's call may meet: not those of background uploads."""
        foreground = sum(1 for kind, keys in self.store.fired if not background(kind, keys))
        return foreground + self.refusals_before + (self.disk.refusals if self.disk is not None else 0)

    # ----- running one step -----------------------------------------------------------

    async def _step(self, afn, args):
        # While the step runs, a wait on time alone moves the clock (to the next retry, and
        # at last to STEP_TIMEOUT: a wait nothing ends); between steps it stands still.
        seed_scheduler(self.schedule)
        self.clock.autojump_threshold = 0
        try:
            with trio.fail_after(STEP_TIMEOUT):
                with contextlib.suppress(Done):
                    await afn(*args)
        finally:
            self.clock.autojump_threshold = math.inf
        await trio.testing.wait_all_tasks_blocked()
        self._note_fired()
        await self._check()
        await trio.testing.wait_all_tasks_blocked()

    def _note_fired(self) -> None:
        # An upload attempt fails with its first failure (a multipart upload's parts fail in
        # parallel: one refused for good after one that may pass is retried); a step holds
        # one attempt per file at most (retries wait 1 s or more, time moves between steps).
        first: dict[str, str] = {}
        for kind, keys in self.store.fired[self.fired_seen:]:
            if background(kind, keys):
                first.setdefault(keys[-1], kind)
                continue
            for f in self._all_files():
                if f.path is not None and f.path in keys:
                    f.tainted = True
        for f in self._all_files():
            if f.path is not None and first.get(f.path, "").endswith(" denied"):
                self._stuck(f)
        self.fired_seen = len(self.store.fired)

    def _stuck(self, f: File) -> None:
        """Its upload failed for good: kept in the spool (FAILED); S3 keeps what it had."""
        f.stuck = True
        self.ok[f.path] = self.allowed(f.path) | self.seen.get(f.path, {None})

    # ----- checks -----------------------------------------------------------------------

    async def _check(self) -> None:
        self.store.suspended = True
        try:
            self._check_store()
            for key, fn in list(self.resolve.items()):
                fn(self.store.content(key))
            self.resolve.clear()
            if self.rebuild:
                self.rebuild = False
                self._rebuild({k: v for k, (v, _) in self.store.objects.items() if not k.endswith("/")})
            await self._check_listings()
            await self._check_open_sizes()
        finally:
            self.store.suspended = False
        for key, values in self.ok.items():
            self.seen.setdefault(key, {None}).update(values)  # (None: S3's at the last drain)

    def _check_store(self) -> None:
        strict, self.strict = self.strict, False
        for key in sorted(set(self.store.objects) | set(self.ok) | set(self.seen)):
            have, want = self.store.content(key), self.allowed(key)
            if not strict:  # uploads still to come: what S3 held since the last drain
                want = want | self.seen.get(key, {None})
            assert have in want, (f"store{' (spool drained)' if strict else ''}: {key!r} holds {have!r}; "
                                  f"the model allows {sorted(want, key=repr)}")
        for kind, key in self.store.writes:
            assert kind == "copy" or not temporary(key), \
                f"store: the mount sent {kind} of {key!r}, a temporary name"
        if not strict:
            return
        self.seen = {key: set(values) for key, values in self.ok.items()}
        for f in list(self.files.values()):
            if f.stuck:
                # README: a failure that cannot succeed stays in the spool as `failed`.
                held = self.core.files.get(f.path)
                state = held.state.value if held is not None else "not held"
                assert held is not None and held.state is State.FAILED and held.spooled is not None \
                    and held.spooled.key == f.path, \
                    f"{f.path}: its upload failed for good, yet it is {state}, not failed in the spool"
            f.pending = False

    # ----- the model's view ------------------------------------------------------------

    def _sent(self, f: File) -> None:
        super()._sent(f)
        f.pending, f.stuck = True, False  # in the spool; in S3 once it drains

    def quiet(self, path: str) -> bool:
        f = self.files.get(path)
        return super().quiet(path) and (f is None or not (f.pending or f.stuck))

    def _add_fh(self, fh: int, inode: int, f: File, mode: str, created: bool) -> None:
        super()._add_fh(fh, inode, f, mode, created)
        h = self.fhs[fh]
        h.streaming = False  # write-back stages every new file
        if not h.live and (f.pending or f.stuck):
            h.live = None  # held (spooled) or uploaded and dropped: the model cannot tell
        if h.writable and f.stuck:
            f.stuck, f.pending = False, True  # to be changed: sent again at its close

    def _move(self, f: File, src: str, dst: str, before_dst: set, in_folder: bool = False) -> None:
        if not f.stuck or temporary(dst):
            f.stuck = False
            super()._move(f, src, dst, before_dst, in_folder)
            return
        # Failed for good: its content is in the spool alone, and goes there under the new
        # name (at the next start). S3 loses the old name; the new one keeps what it held
        # (a folder move copies S3's objects as they are: the old one's too).
        old = self.allowed(src)
        del self.files[src]
        f.path = dst
        self.files[dst] = f
        for h in self.handles_of(f):
            h.moved = True
        self.expect(src, None)
        self.expect(dst, *(before_dst | (old if in_folder else set())))

    def _after_failed_dir_rename(self, src: str, dst: str, inside: list[File]) -> None:
        """A failed folder rename leaves a file still in the spool where it was (its upload
        goes to its old name; whether it is still there, only the mount knows). A file whose
        upload is done is an object as any other (CoreModel's)."""
        rest = []
        for f in inside:
            held = self.core.files.get(f.path)
            if f.unsent() or not (f.pending or f.stuck) or held is None or held.spooled is None:
                rest.append(f)
                continue
            new = dst + f.path[len(src):]
            at_new = self.store.content(new)
            self.ok[new] = {at_new}
            if at_new is not None:
                self.files[new] = File(bytearray(at_new), new, published=at_new)
            self.ok[f.path] = {self.store.content(f.path)} if f.stuck else {f.published}
        super()._after_failed_dir_rename(src, dst, rest)

    def _rebuild(self, objects: dict[str, bytes], pending: bool = False) -> None:
        """After a crash: the programs are gone; the files are these objects."""
        for f in self._all_files():
            f.path = None
        self.files = {k: File(bytearray(v), k, published=v, pending=pending) for k, v in objects.items()}
