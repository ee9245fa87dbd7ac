"""Credentials that live 20 s: refreshed ahead of expiry, failures waited out or reported.

A second local Minerva runs here with `--credential-lifetime 20`, so expiry happens many times
within a test. The clock is real; the endpoint is told to fail through its fault control.
"""

import errno
import os
import random
import time

import pytest
from helpers import local_minerva_with_lifetime, wait_for

LIFETIME = 20
WORKLOAD_SECONDS = 180.0  # how long the workload runs (its length, not a timing assertion)
EXPIRED = ("InvalidAccessKeyId", "ExpiredToken")
KEEP = 20  # files the workload keeps in Incoming/; older ones are deleted


@pytest.fixture(scope="module")
def short_lived(tmp_path_factory):
    with local_minerva_with_lifetime(tmp_path_factory, LIFETIME) as local:
        yield local


@pytest.fixture
def area(short_lived):
    short_lived.fault("ok")
    short_lived.wipe()
    yield short_lived
    short_lived.fault("ok")


def _endpoint_calls(local) -> int:
    return (local.state_dir / "server.log").read_text().count("POST /storage/boto ")


@pytest.mark.slow
def test_three_minutes_of_mixed_work_across_expiry_without_an_error(area, mount_factory, tmp_path):
    for n in range(3):
        area.put(f"Outgoing/export-{n}.bin", os.urandom((n + 1) << 20))
    exports = {f"export-{n}.bin": area.get(f"Outgoing/export-{n}.bin") for n in range(3)}
    calls_before = _endpoint_calls(area)
    mount = mount_factory(local=area)
    incoming, outgoing = mount.path / "Incoming", mount.path / "Outgoing"
    sent: dict[str, bytes] = {}
    rng = random.Random(5)
    end = time.monotonic() + WORKLOAD_SECONDS
    step = 0
    while time.monotonic() < end:
        step += 1
        name = f"in-{step}.bin"
        data = os.urandom(rng.choice([1, 64 << 10, 1 << 20, 9 << 20]))  # 9 MiB: multipart
        (incoming / name).write_bytes(data)  # copy in
        sent[name] = data
        if len(sent) > KEEP:  # delete, which also keeps the disk the server uses bounded
            oldest = next(iter(sent))
            (incoming / oldest).unlink()
            del sent[oldest]
        if step % 3 == 0:
            (incoming / f"sub-{step}").mkdir()
        export = rng.choice(sorted(exports))
        assert (outgoing / export).read_bytes() == exports[export]  # read out
        back = rng.choice(sorted(sent))
        assert (incoming / back).read_bytes() == sent[back]
        assert set(sent) <= set(os.listdir(incoming))  # listings
        assert sorted(os.listdir(outgoing)) == sorted(exports)
    assert {k: area.get(k) for k in area.keys("Incoming/") if not k.endswith("/")} == {
        f"Incoming/{k}": v for k, v in sent.items()}
    log = mount.log()
    assert not any(code in log for code in EXPIRED), "a request was signed with expired credentials"
    assert " ERROR " not in log and "credential refresh failed" not in log
    refreshes = log.count("credentials refreshed")
    assert refreshes >= WORKLOAD_SECONDS / LIFETIME  # refreshed ahead of every expiry ...
    # ... by one refresh at a time, never a call per request (hundreds of requests were made)
    assert _endpoint_calls(area) - calls_before == refreshes
    assert step > 20


def _write(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _fails_with(errnum: int, action):
    def attempt():
        try:
            action()
        except OSError as exc:
            assert exc.errno == errnum, f"expected errno {errnum}, got {exc!r}"
            return True
        return False
    return attempt


@pytest.mark.parametrize("mode, cause", [
    ("500", "credential endpoint answered 500 internal_error"),
    ("malformed", "malformed credential response: missing field 'aws_session_token'"),
])
def test_endpoint_failing_past_expiry_gives_eio_after_the_wait_then_recovers(area, mount_factory,
                                                                             mode, cause):
    mount = mount_factory(local=area, extra=("--credential-wait", "5"))
    incoming = mount.path / "Incoming"
    _write(incoming / "before.txt", b"before")
    area.fault(mode)
    counter = iter(range(10**6))
    wait_for(_fails_with(errno.EIO, lambda: _write(incoming / f"during-{next(counter)}.txt", b"x")),
             "operations to fail once the credentials expired", timeout=3 * LIFETIME)
    log = mount.log()
    assert f"credential refresh failed: {cause}" in log
    assert f"no valid Minerva credentials after 5 s: {cause}" in log
    assert log.count(f"credential refresh failed: {cause}") == 1  # once, not per retry

    area.fault("ok")  # the endpoint is back: the same mount recovers by itself
    wait_for(_succeeds(lambda: _write(incoming / "after.txt", b"after")), "the mount to recover",
             timeout=3 * LIFETIME)
    assert area.get("Incoming/after.txt") == b"after"
    assert area.get("Incoming/before.txt") == b"before"


def _succeeds(action):
    def attempt():
        try:
            action()
            return True
        except OSError:
            return False
    return attempt


@pytest.mark.parametrize("mode, message", [
    ("401", "the Minerva API key was refused (401 unauthorized)"),
    ("403", "this API key is not entitled to Minerva storage (403 forbidden)"),
])
def test_key_revoked_at_refresh_gives_eacces_and_one_log_line(area, mount_factory, mode, message):
    # A listing is trusted for --metadata-ttl (30 s by default): keep it short so that listing
    # the folder asks S3, and is refused, soon after the credentials expire.
    mount = mount_factory(local=area, extra=("--metadata-ttl", "1"))
    incoming = mount.path / "Incoming"
    _write(incoming / "before.txt", b"before")
    area.fault(mode)
    wait_for(_fails_with(errno.EACCES, lambda: os.listdir(incoming)),
             "operations to be refused once the credentials expired", timeout=3 * LIFETIME)
    for n in range(20):  # many refused operations ...
        with pytest.raises(PermissionError):
            _write(incoming / f"refused-{n}.txt", b"x")
        with pytest.raises(PermissionError):
            os.listdir(incoming)
    log = mount.log()
    assert log.count(message) == 1  # ... one clear line, not a flood
    assert log.count(" ERROR ") == 1
    assert area.keys("Incoming/") == ["Incoming/before.txt"]
