"""Fixtures: a local Minerva per session, a real FUSE mount per test (helpers.py has the parts).

Everything started here is stopped by pid, and every mount unmounted with fusermount3, also
when a test fails.
"""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from helpers import MOUNT_LOGS, LocalMinerva, Mount, running_local_minerva, start_mount, wait_for


@pytest.fixture(scope="session")
def local_minerva(tmp_path_factory) -> LocalMinerva:
    with running_local_minerva(tmp_path_factory.mktemp("local-minerva")) as local:
        yield local


@pytest.fixture(scope="session", autouse=True)
def no_access_denied_anywhere():
    """No request outside the org prefix or the allowed actions, in the whole suite.

    The store logs every AccessDenied S3 answers with a fixed marker; the real service would
    refuse such a request, so any of them is a bug even when the test that caused it passed.
    """
    yield
    from minerva_mount.store import ACCESS_DENIED_MARKER

    found = [f"{log}: {line}" for log in MOUNT_LOGS if log.exists()
             for line in log.read_text(errors="replace").splitlines() if ACCESS_DENIED_MARKER in line]
    assert not found, "S3 answered AccessDenied:\n" + "\n".join(found[:20])


@pytest.fixture
def mount_factory(local_minerva, tmp_path):
    mounts: list[Mount] = []

    def make(key: str | None = None, name: str = "mnt", extra: tuple[str, ...] = (),
             local: LocalMinerva | None = None) -> Mount:
        path, log_file = tmp_path / name, tmp_path / f"{name}.log"
        if "--cache-dir" not in extra:  # not the user's cache: it would grow across runs
            extra = ("--cache-dir", str(tmp_path / f"{name}.cache"), *extra)
        proc = start_mount(local or local_minerva, path, log_file, key, extra)
        mount = Mount(path, proc, log_file)
        mounts.append(mount)
        MOUNT_LOGS.append(log_file)

        def live():
            if proc.poll() is not None:
                raise AssertionError(f"mount exited {proc.returncode}: {proc.stderr.read().decode()}")
            return os.path.ismount(path)
        wait_for(live, f"the mount at {path}")
        return mount

    make.mounts = mounts  # for the failure report below
    yield make
    for mount in mounts:
        if mount.proc.poll() is None or os.path.ismount(mount.path):
            mount.unmount()
        try:
            os.stat(mount.path)
        except OSError:  # a dead mount ('Transport endpoint is not connected') after a kill
            subprocess.run(["fusermount3", "-u", "-z", str(mount.path)], check=False, capture_output=True)


@pytest.fixture
def mount(local_minerva, mount_factory) -> Mount:
    local_minerva.wipe()
    return mount_factory()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report ends with the tail of each of its mounts' logs (CI shows no files)."""
    report = (yield).get_result()
    if report.when == "call" and report.failed:
        for mount in getattr(item.funcargs.get("mount_factory"), "mounts", ()):
            if mount.log_file.exists():
                tail = mount.log().splitlines()[-40:]
                report.sections.append((f"log of the mount {mount.path.name} (last lines)", "\n".join(tail)))


@pytest.fixture
def runtime_dir(monkeypatch):
    """A private XDG_RUNTIME_DIR for the control socket `status` talks to (Unix socket paths
    are limited to 108 bytes, so it is short)."""
    path = tempfile.mkdtemp(prefix="mm-run-")
    monkeypatch.setenv("XDG_RUNTIME_DIR", path)
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def wiped(local_minerva):
    """The local Minerva with every object deleted (for tests that start their own mounts)."""
    local_minerva.wipe()
    return local_minerva
