"""Model-based test: random file operations on the mount and on a local folder agree.

Hypothesis drives create/write, read, rename, unlink, mkdir and rmdir in a folder under
Incoming/ and the same steps in a plain local folder (the reference); after every step both
trees must hold the same folders and the same bytes, and each step must succeed on both or
fail on both with the same errno. Bounded for CI: a few examples of a dozen steps each.
"""

import errno
import itertools
import os
import shutil
import time

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

NAMES = st.sampled_from(["a", "b", "c.txt", "d e", "é"])
DATA = st.binary(max_size=1 << 16) | st.sampled_from([b"", b"x" * (9 << 20)])
DEPTH = st.lists(st.sampled_from(["a", "b", "sub"]), max_size=2).map(tuple)


def _tree(root: str) -> dict[str, bytes | None]:
    """Every folder (None) and file (bytes) under root, by relative path."""
    found: dict[str, bytes | None] = {}
    for folder, dirs, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        for d in dirs:
            found[os.path.normpath(os.path.join(rel, d))] = None
        for f in files:
            found[os.path.normpath(os.path.join(rel, f))] = _read(os.path.join(folder, f))
    return found


def _outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except OSError as exc:
        return ("error", exc.errno)


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _read(path: str) -> bytes:
    """The file's bytes; a new file closed without a write (empty) is published when the kernel
    releases it, just after close() returns: until then it answers EBUSY, so poll for that."""
    end = time.monotonic() + 30
    while True:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > end:
                raise
        time.sleep(0.05)


def test_random_operations_match_a_local_folder(mount, tmp_path):
    runs = itertools.count()

    class MountMatchesLocalFolder(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            n = next(runs)
            self.real = str(mount.path / "Incoming" / f"model-{n}")
            self.ref = str(tmp_path / f"ref-{n}")
            os.mkdir(self.real)
            os.mkdir(self.ref)

        def both(self, fn, *rel_paths):
            real = _outcome(fn, *[os.path.join(self.real, *p) for p in rel_paths])
            ref = _outcome(fn, *[os.path.join(self.ref, *p) for p in rel_paths])
            assert real == ref, f"{fn.__name__}{rel_paths}: mount {real}, local folder {ref}"

        @rule(where=DEPTH, name=NAMES, data=DATA)
        def write(self, where, name, data):
            self.both(lambda p: _write(p, data), (*where, name))

        @rule(where=DEPTH, name=NAMES)
        def read(self, where, name):
            self.both(_read, (*where, name))

        @rule(where=DEPTH, name=NAMES)
        def unlink(self, where, name):
            self.both(os.unlink, (*where, name))

        @rule(where=DEPTH, name=NAMES)
        def mkdir(self, where, name):
            self.both(os.mkdir, (*where, name))

        @rule(where=DEPTH, name=NAMES)
        def rmdir(self, where, name):
            self.both(os.rmdir, (*where, name))

        @rule(src=DEPTH, src_name=NAMES, dst=DEPTH, dst_name=NAMES)
        def rename(self, src, src_name, dst, dst_name):
            self.both(os.rename, (*src, src_name), (*dst, dst_name))

        @invariant()
        def same_tree(self):
            assert _tree(self.real) == _tree(self.ref)

        def teardown(self):
            shutil.rmtree(self.ref, ignore_errors=True)

    run_state_machine_as_test(MountMatchesLocalFolder, settings=settings(
        max_examples=30, stateful_step_count=20, deadline=None, derandomize=True,
        suppress_health_check=list(HealthCheck)))
