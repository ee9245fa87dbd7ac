"""Refusals a desktop makes on purpose are not failures: "move to trash" probes .Trash-UID.

GIO (Nautilus) and KIO try to mkdir .Trash-UID at the top of the mount on every trashing and
offer to delete when refused. That refusal is logged at INFO and kept out of `status`'s recent
failures; every other refusal is still a WARNING there.
"""

import errno
import logging

from test_core import WRITE_NEW, expect_errno, inode_of, run

from minerva_mount.namespace import ROOT_INODE
from minerva_mount.report import RecentFailures


def refusals(caplog) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records if "refused" in r.getMessage()]


def test_trash_probes_are_logged_at_info_and_not_counted_as_failures(caplog):
    caplog.set_level(logging.INFO, logger="minerva")
    failures = RecentFailures().install()
    try:
        async def test(core, store):
            before = store.requests.copy()
            for name in (b".Trash-0", b".Trash-1000", b".Trash"):
                await expect_errno(errno.EACCES, core.mkdir(ROOT_INODE, name))
            assert store.requests == before  # refused before any request
        run(test)
        assert list(failures.entries) == [] and failures.errors == 0
        assert refusals(caplog) == [
            ("INFO", f"refused mkdir of {name}: the mount root is fixed")
            for name in (".Trash-0", ".Trash-1000", ".Trash")]
    finally:
        failures.remove()


def test_other_refusals_stay_warnings_listed_as_recent_failures(caplog):
    caplog.set_level(logging.INFO, logger="minerva")
    failures = RecentFailures().install()
    try:
        async def test(core, store):
            await expect_errno(errno.EACCES, core.mkdir(ROOT_INODE, b"Reports"))
            await expect_errno(errno.EACCES, core.mkdir(ROOT_INODE, b".Trash-0x"))  # not a probe
            outgoing = await inode_of(core, "Outgoing")
            # Not a mkdir: a file named like the trash is an ordinary refused create.
            await expect_errno(errno.EACCES, core.create(outgoing, b".Trash-0", WRITE_NEW))
        run(test)
        assert [(e["level"], e["message"]) for e in failures.entries] == [
            ("WARNING", "refused mkdir of Reports: the mount root is fixed"),
            ("WARNING", "refused mkdir of .Trash-0x: the mount root is fixed"),
            ("WARNING", "refused create of Outgoing/.Trash-0: only Incoming/ takes new files")]
    finally:
        failures.remove()
