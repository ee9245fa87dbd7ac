"""No exception in a handler kills the FUSE session: a bug is logged with its traceback and
answered EIO, and the next request is served as usual.

Driven through the adapter (fs.Operations) over a Core whose store raises an unexpected
exception, without a kernel: pyfuse3 is imported but no session is started.
"""

import errno
import logging

import pyfuse3
import pytest
import trio

from minerva_mount.core import Core
from minerva_mount.fakestore import FakeStore
from minerva_mount.fs import Operations
from minerva_mount.namespace import ROOT_INODE


class BuggyStore(FakeStore):
    """A store with a bug: listing raises something no layer expects, while `broken` is set."""

    broken = True

    async def list_dir(self, path):
        if self.broken:
            raise KeyError("a bug deep in the store")
        return await super().list_dir(path)


def test_unexpected_exception_in_a_handler_is_logged_with_traceback_and_answered_eio(caplog):
    async def main():
        store = BuggyStore()
        store.add("Incoming/a.txt", b"a")
        async with trio.open_nursery() as nursery:
            ops = Operations(Core(store, nursery))
            with pytest.raises(pyfuse3.FUSEError) as failure:
                await ops.lookup(ROOT_INODE, b"Exports", None)  # not Incoming/Outgoing: needs a LIST
            assert failure.value.errno == errno.EIO
            with pytest.raises(pyfuse3.FUSEError) as failure:
                await ops.opendir(ROOT_INODE, None)
            assert failure.value.errno == errno.EIO

            store.broken = False  # the same adapter goes on serving
            incoming = await ops.lookup(ROOT_INODE, b"Incoming", None)
            entry = await ops.lookup(incoming.st_ino, b"a.txt", None)
            assert entry.st_size == 1
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.ERROR, logger="minerva.fs"):
        trio.run(main)
    bugs = [r for r in caplog.records if r.getMessage().startswith("unexpected error in")]
    assert [r.getMessage() for r in bugs] == ["unexpected error in lookup", "unexpected error in opendir"]
    assert all(r.exc_info and r.exc_info[0] is KeyError for r in bugs)  # traceback logged


def test_expected_errors_keep_their_errno_without_a_traceback(caplog):
    async def main():
        async with trio.open_nursery() as nursery:
            ops = Operations(Core(FakeStore(), nursery))
            absent = await ops.lookup(ROOT_INODE, b"missing", None)
            assert absent.st_ino == 0  # ENOENT as a negative entry the kernel may cache
            with pytest.raises(pyfuse3.FUSEError) as failure:
                await ops.getattr(12345, None)
            assert failure.value.errno == errno.ENOENT
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.ERROR):
        trio.run(main)
    assert not [r for r in caplog.records if r.exc_info]
