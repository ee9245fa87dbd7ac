"""Model test of Core with write-back (`--write-back`): test_core_model.py's machine, over a spool.

The same programs (CoreModel's rules) run against a Core built as daemon.py builds it with
write-back: a WriteBack over a spool folder of its own, its uploader started with
`nursery.start(writeback.run, core.files, core.restore_spooled)`. A close returns once the
file is durable in the spool; uploads go on in the background. The loop runs on a MockClock
that stands still between steps, so background retries (backoff 1 s doubling to 60 s) wait
until the model lets time pass; threads are run inline (wb_support.inline_threads), so what
runs in a step is the same on every run.

What the model changes
- `ok[key]` keeps meaning what S3 holds once everything sent is sent (write-through's
  "after the close"); with write-back that is what S3 holds once the spool drains. After a
  step S3 may hold any content `ok` allowed since the last drain (`seen`); at a `sync` (S3
  heals, the clock moves on until every spooled file is uploaded or failed for good:
  wb_support.drain_spool) it must hold exactly what `ok` allows.
- Failures of background uploads are no program's business: no later call may fail for
  them. One that cannot succeed (AccessDenied: the `deny` rule) leaves the file FAILED in
  the spool (checked at every sync: never silently dropped); S3 keeps what it had.
- `crash`: the daemon dies without draining (every task cancelled, every descriptor
  closed); a new Core and WriteBack start over the same spool folder and store. Every file
  whose close returned must arrive whole, once, under its last name; unsent changes of files
  still open are lost, as are kept-back files (SEMANTICS).
- New files are never streamed (write-back stages them all): no EBUSY for readers, no
  EOPNOTSUPP after a first part.
- PROMISE not made: a change made outside (a pipeline's PUT or DELETE) of a file whose upload
  is still to come is overwritten by that upload; the model makes none to such files.
- PROMISE not made: a file opened for writing again is not sent by a `sync` while open (its
  last closed version stays in the spool, sent after a crash, replaced by its next close).

What it found is pinned in test_core_regressions.py (test_wb_*, WB1-WB10), each the
shortest sequence, as plain Core calls.
"""

import math
import os

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule, run_state_machine_as_test
from model_support import quiet_logs, set_small_parts
from test_core_model import OPEN_FLAGS, SUBDIRS, CoreModel, parent_of, temporary
from wb_model import STEP_TIMEOUT, UPLOADS, WriteBackModel
from wb_support import drain_spool, inline_threads


class CoreModelWriteBack(WriteBackModel):
    """CoreModel's rules, and those of write-back: time, sync, S3 down or refusing, crash."""

    # ----- rules: time, sync, failures for good, crash -------------------------------------

    @rule(seed=st.integers(min_value=0, max_value=1 << 16))
    def reshuffle(self, seed):
        """Another order for tasks runnable at once (trio's scheduler, seeded at every step)."""
        self.schedule = seed

    def spooling(self) -> bool:
        return any(f.pending or f.stuck for f in self.files.values())

    @rule(path=CoreModel.incoming_paths, payload=CoreModel.payloads)
    def copy_in(self, path, payload):
        """`cp` (create, write, close): write-back's reason to be, one step."""
        self.step(self._copy_in, path, payload)

    async def _copy_in(self, path, payload):
        count = len(self.descs)
        await self._create(path, "W", False)  # (an existing file is opened O_TRUNC)
        if len(self.descs) == count:
            return
        await self._write(self.descs[-1], payload, 0)
        await self._close(len(self.descs) - 1, True)

    @precondition(lambda self: self.spooling())
    @rule(data=st.data(), action=st.sampled_from(["rename", "unlink", "open", "truncate", "read", "folder"]),
          other=CoreModel.file_paths)
    def spooled_file(self, data, action, other):
        """Something happens to a file in the spool (perhaps uploaded since): the states
        write-back adds, which a path drawn at random seldom meets."""
        path = data.draw(st.sampled_from(sorted(p for p, f in self.files.items() if f.pending or f.stuck)),
                         label="spooled file")
        if action == "rename":
            self.step(self._rename, path, other)
        elif action == "unlink":
            self.step(self._unlink, path)
        elif action == "open":
            self.step(self._open, path, data.draw(st.sampled_from(list(OPEN_FLAGS)), label="mode"))
        elif action == "truncate":
            self.step(self._truncate, path, data.draw(CoreModel.sizes, label="size"))
        elif action == "read":
            self.step(self._read_path, path)
        elif parent_of(path) in SUBDIRS:  # its folder is renamed
            self.step(self._rename, parent_of(path), data.draw(st.sampled_from(SUBDIRS), label="to"))

    @precondition(lambda self: self.spooling())
    @rule(seconds=st.sampled_from([1, 4, 60]))
    def time_passes(self, seconds):
        """Background retries due by then run."""
        self.step(self._time_passes, seconds)

    async def _time_passes(self, seconds):
        self.clock.jump(seconds)

    @precondition(lambda self: self.spooling())
    @rule()
    def sync(self):
        """`minerva-mount sync`: S3 is back; wait until the spool drains; S3 holds what `ok` says."""
        self.step(self._sync)

    async def _sync(self):
        for f in self.files.values():
            if f.pending and self.open_writers(f):
                # PROMISE not made: a file open for writing again is not sent by a sync (its
                # last closed version stays in the spool for a crash, until its next close).
                self.ok[f.path] = self.allowed(f.path) | self.seen.get(f.path, {None})
        self.store.heal()
        if self.disk is not None:
            self.disk.mode = None
        await drain_spool(self.core)
        self.strict = True

    @rule(which=st.sampled_from(["uploads", "completions", "parts"]))
    def s3_down(self, which):
        """Uploads fail until healed (retried in the background): files stay in the spool, and
        a multipart upload whose completions fail keeps its parts for a resume."""
        self.store.failing |= {"uploads": set(UPLOADS), "completions": {"put", "complete_multipart"},
                               "parts": {"upload_part"}}[which]

    @rule(kind=st.sampled_from(UPLOADS))
    def deny(self, kind):
        """S3 refuses uploads for good (403: the key lost its entitlement) until healed."""
        self.store.denied.add(kind)

    @precondition(lambda self: self.fhs or self.spooling())
    @rule(then_sync=st.booleans())
    def crash(self, then_sync):
        """SIGKILL: the daemon and every program using the mount die; the daemon starts again."""
        self.step(self._crash, then_sync)

    async def _crash(self, then_sync: bool):
        for f in self._all_files():
            if f.path is None:
                continue
            if f.published is not None and (f.stuck or (f.pending and self.open_writers(f))):
                # Its last closed version is in the spool (one that failed for good is tried
                # again at the next start; one open for writing again was not sent): it arrives.
                self.expect(f.path, f.published)
                f.stuck, f.pending = False, True
        self.descs.clear()
        self.fhs.clear()
        self.unreleased.clear()
        self.refusals_before += self.disk.refusals
        self.core = await self.daemon.restart()
        self.disk = self.daemon.disk
        # What the mount shows after the start: the objects S3 will hold once the spool drains.
        final = {k: v for k, v in self.ok.items() if not k.endswith("/")}
        if then_sync or any(len(v) != 1 for v in final.values()):
            await self._sync()
            self.rebuild = True
            return
        self._rebuild({k: next(iter(v)) for k, v in final.items() if next(iter(v)) is not None}, pending=True)

    # ----- the end --------------------------------------------------------------------------

    async def _finish(self):
        """Every program exits; S3 is healthy; the spool drains; then checks."""
        await self._exit_all()
        await self._step(self._sync, ())
        self.clock.autojump_threshold = 0
        try:
            with trio.fail_after(STEP_TIMEOUT):
                left = await self.core.drain(0.2)
        finally:
            self.clock.autojump_threshold = math.inf
        # Kept back (never renamed to a final name) and failed for good: named at the stop.
        kept = {p for p, f in self.files.items() if self.kept_back(f) or f.stuck}
        maybe = {p for p, f in self.files.items() if f.changed and temporary(p)}
        assert kept <= set(left) <= kept | maybe, \
            f"drain after every file was closed and the spool drained: unfinished {sorted(left)}; " \
            f"the model: {sorted(kept)}"


@pytest.mark.timeout(1800)
def test_core_matches_model_with_write_back(monkeypatch):
    set_small_parts(monkeypatch)
    with quiet_logs(), inline_threads():
        run_state_machine_as_test(CoreModelWriteBack, settings=settings(
            max_examples=int(os.environ.get("MODEL_EXAMPLES", 2000)), stateful_step_count=40,
            derandomize=not os.environ.get("MODEL_RANDOM"),  # see model_support.py
            deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
