"""The local Minerva against its contract: the real server (weed + credential endpoint) runs as
a subprocess, exactly as a user starts it, and is driven over HTTP and S3 from here."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest
from botocore.config import Config

from minerva_mount.local.seaweed import PORTS_RECORD, forget_previous_run

REPO = Path(__file__).resolve().parents[2]
LIFETIME = 20
START_DEADLINE = 90.0
STOP_DEADLINE = 30.0

CREDENTIAL_FIELDS = {
    "aws_region",
    "aws_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "aws_session_expiration",
}
ERROR_BODIES = {
    401: ("unauthorized", "Unauthorized"),
    403: ("forbidden", "Forbidden"),
    500: (
        "internal_error",
        "An unknown error occurred, please contact help@minerva.io if problem persists",
    ),
}


# -- running the server ---------------------------------------------------------------------


@dataclass
class Local:
    state_dir: Path
    proc: subprocess.Popen[bytes]
    info: dict[str, Any]
    stderr_path: Path

    @property
    def api_url(self) -> str:
        return self.info["api_url"]

    def key(self, prefix: str) -> str:
        return next(o["api_key"] for o in self.info["orgs"] if o["prefix"] == prefix)


def start_server(state_dir: Path, lifetime: int) -> Local:
    """Start the server and wait (with a deadline) for the local.json it writes."""
    stderr_path = state_dir.parent / f"{state_dir.name}.stderr"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(stderr_path, "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "minerva_mount.local.server", "--state-dir", str(state_dir)]
            + ["--credential-lifetime", str(lifetime)],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + START_DEADLINE
        while True:
            info = _read_local_json(state_dir)
            if info is not None and info["pid"] == proc.pid:
                return Local(state_dir, proc, info, stderr_path)
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}: {stderr_path.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no local.json after {START_DEADLINE} s: {stderr_path.read_text()}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.1)  # poll interval; returns early if the server exits
    except BaseException:
        stop_server(proc)
        raise


def _read_local_json(state_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((state_dir / "local.json").read_text())
    except FileNotFoundError:
        return None


def stop_server(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then SIGKILL if the server does not stop in time; returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def child_pids(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(p) for p in text.split()]


def weed_pid(local: Local) -> int:
    pids = [p for p in child_pids(local.proc.pid) if _comm(p) == "weed"]
    assert len(pids) == 1, pids
    return pids[0]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        return ""


def pid_alive(pid: int) -> bool:
    """Any thread of `pid` still runs (a zombie leader can outlive its other threads)."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return False
    for task in tasks:
        try:
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if state not in ("Z", "X"):
            return True
    return False


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)  # poll interval


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Local]:
    state_dir = tmp_path_factory.mktemp("minerva") / "state"
    server = start_server(state_dir, LIFETIME)
    try:
        yield server
    finally:
        stop_server(server.proc)


@pytest.fixture
def fault(local: Local) -> Iterator[Callable[[str], None]]:
    """Set a fault mode for one test; "ok" is restored afterwards whatever happens."""

    def set_mode(mode: str) -> None:
        status, body = call(local.api_url, "/_local/fault", data={"mode": mode})[:2]
        assert (status, body) == (200, {"mode": mode})

    try:
        yield set_mode
    finally:
        set_mode("ok")


# -- HTTP and S3 helpers ----------------------------------------------------------------------


def call(
    api_url: str,
    path: str = "/storage/boto",
    *,
    key: str | None = None,
    method: str = "POST",
    data: dict[str, Any] | None = None,
    timeout: float = 30,
) -> tuple[int, Any, Any]:
    """One request; returns (status, parsed JSON body, headers) whatever the status."""
    headers = {} if key is None else {"x-api-key": key}
    body = None if data is None else json.dumps(data).encode()
    if body is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(api_url + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw, hdrs = response.status, response.read(), response.headers
    except urllib.error.HTTPError as e:
        status, raw, hdrs = e.code, e.read(), e.headers
    return status, (json.loads(raw) if raw else None), hdrs


def fetch(local: Local, prefix: str = "acme/") -> dict[str, Any]:
    status, body, _ = call(local.api_url, key=local.key(prefix))
    assert status == 200, body
    return body


def s3_for(local: Local, body: dict[str, Any]) -> Any:
    creds = body["credentials"]
    return boto3.session.Session().client(
        "s3",
        endpoint_url=local.info["s3_endpoint"],
        aws_access_key_id=creds["aws_key_id"],
        aws_secret_access_key=creds["aws_secret_access_key"],
        aws_session_token=creds["aws_session_token"],
        region_name=creds["aws_region"],
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


def admin_s3(local: Local) -> Any:
    admin = local.info["admin"]
    return boto3.session.Session().client(
        "s3",
        endpoint_url=local.info["s3_endpoint"],
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}),
        **admin,
    )


def s3_error(operation: Callable[..., Any], **params: Any) -> str:
    """The S3 error code `operation(**params)` fails with (fails the test if it succeeds)."""
    with pytest.raises(botocore.exceptions.ClientError) as info:
        operation(**params)
    return info.value.response["Error"]["Code"]


# -- the contract -----------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["acme/", "globex/"])
def test_success_body_has_documented_shape(local: Local, prefix: str) -> None:
    status, body, headers = call(local.api_url, key=local.key(prefix))
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert set(body) == {"credentials", "bucket_info"}
    creds, bucket = body["credentials"], body["bucket_info"]
    assert set(creds) == CREDENTIAL_FIELDS
    assert all(isinstance(v, str) and v for v in creds.values())
    assert creds["aws_region"] == "us-east-1"
    assert bucket == {
        "name": local.info["bucket"],
        "prefix": prefix,
        "uri": f"s3://{local.info['bucket']}/{prefix}",
    }
    expiration = datetime.fromisoformat(creds["aws_session_expiration"])
    assert creds["aws_session_expiration"].endswith("+00:00")
    assert expiration.utcoffset() is not None and expiration.utcoffset().total_seconds() == 0
    ahead = (expiration - datetime.now(UTC)).total_seconds()
    assert LIFETIME - 5 < ahead <= LIFETIME + 1


def test_each_call_mints_fresh_credentials(local: Local) -> None:
    first, second = fetch(local)["credentials"], fetch(local)["credentials"]
    assert first["aws_key_id"] != second["aws_key_id"]
    assert first["aws_session_token"] != second["aws_session_token"]


@pytest.mark.parametrize(
    ("which", "status"), [("missing", 401), ("wrong", 401), ("empty", 401), ("forbidden", 403)]
)
def test_refusals_have_documented_bodies(local: Local, which: str, status: int) -> None:
    key = {
        "missing": None,
        "wrong": "mk_local_not-a-key",
        "empty": "",
        "forbidden": local.info["forbidden_api_key"],
    }[which]
    got, body, headers = call(local.api_url, key=key)
    assert got == status
    assert headers["Content-Type"] == "application/json"
    assert_error_body(body, status)


def assert_error_body(body: dict[str, Any], status: int) -> None:
    assert set(body) == {"code", "message", "api_request_id"}
    assert (body["code"], body["message"]) == ERROR_BODIES[status]
    uuid.UUID(body["api_request_id"])


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/storage/boto", 405),
        ("PUT", "/storage/boto", 405),
        ("DELETE", "/storage/boto", 405),
        ("POST", "/storage", 404),
        ("POST", "/storage/boto/x", 404),
        ("GET", "/", 404),
    ],
)
def test_other_paths_and_methods(local: Local, method: str, path: str, status: int) -> None:
    key = local.key("acme/")
    assert call(local.api_url, path, key=key, method=method)[0] == status


# -- what the credentials allow ---------------------------------------------------------------


def test_credentials_work_inside_prefix_only(local: Local) -> None:
    body = fetch(local)
    s3 = s3_for(local, body)
    bucket, prefix = body["bucket_info"]["name"], body["bucket_info"]["prefix"]
    key = f"{prefix}Incoming/scope.txt"

    s3.put_object(Bucket=bucket, Key=key, Body=b"hello")
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == b"hello"
    assert s3.head_object(Bucket=bucket, Key=key)["ContentLength"] == 5
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}Incoming/")
    assert key in [o["Key"] for o in listed["Contents"]]
    top = s3.list_objects_v2(Bucket=bucket, Prefix=prefix, Delimiter="/")
    assert f"{prefix}Incoming/" in [p["Prefix"] for p in top["CommonPrefixes"]]

    s3.copy_object(Bucket=bucket, Key=key + ".copy", CopySource={"Bucket": bucket, "Key": key})
    upload = s3.create_multipart_upload(Bucket=bucket, Key=key + ".mpu")["UploadId"]
    part = s3.upload_part(
        Bucket=bucket, Key=key + ".mpu", UploadId=upload, PartNumber=1, Body=b"m" * 10
    )
    s3.complete_multipart_upload(
        Bucket=bucket,
        Key=key + ".mpu",
        UploadId=upload,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
    )
    assert s3.get_object(Bucket=bucket, Key=key + ".mpu")["Body"].read() == b"m" * 10
    s3.delete_object(Bucket=bucket, Key=key + ".copy")

    admin_s3(local).put_object(Bucket=bucket, Key="other/secret.txt", Body=b"x")
    denied = "AccessDenied"
    assert s3_error(s3.list_objects_v2, Bucket=bucket) == denied
    assert s3_error(s3.list_objects_v2, Bucket=bucket, Prefix="other/") == denied
    assert s3_error(s3.get_object, Bucket=bucket, Key="other/secret.txt") == denied
    assert s3_error(s3.put_object, Bucket=bucket, Key="other/x", Body=b"x") == denied
    assert s3_error(s3.head_bucket, Bucket=bucket) == "403"  # HEAD: a status, no body


def test_orgs_are_isolated(local: Local) -> None:
    acme, globex = fetch(local, "acme/"), fetch(local, "globex/")
    acme_s3, globex_s3 = s3_for(local, acme), s3_for(local, globex)
    bucket = acme["bucket_info"]["name"]
    acme_s3.put_object(Bucket=bucket, Key="acme/Outgoing/a.txt", Body=b"acme")
    globex_s3.put_object(Bucket=bucket, Key="globex/Outgoing/g.txt", Body=b"globex")

    for s3, other in ((globex_s3, "acme/Outgoing/a.txt"), (acme_s3, "globex/Outgoing/g.txt")):
        other_prefix = other.split("/", 1)[0] + "/"
        assert s3_error(s3.get_object, Bucket=bucket, Key=other) == "AccessDenied"
        assert s3_error(s3.put_object, Bucket=bucket, Key=other, Body=b"no") == "AccessDenied"
        assert s3_error(s3.list_objects_v2, Bucket=bucket, Prefix=other_prefix) == "AccessDenied"
    assert acme_s3.get_object(Bucket=bucket, Key="acme/Outgoing/a.txt")["Body"].read() == b"acme"


def test_credentials_expire_with_invalid_access_key_id(local: Local) -> None:
    body = fetch(local)
    s3 = s3_for(local, body)
    bucket, key = body["bucket_info"]["name"], body["bucket_info"]["prefix"] + "expiry.txt"
    expiration = datetime.fromisoformat(body["credentials"]["aws_session_expiration"])
    s3.put_object(Bucket=bucket, Key=key, Body=b"e")

    deadline = time.monotonic() + LIFETIME + 40
    while True:
        try:
            s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        except botocore.exceptions.ClientError as e:
            assert e.response["Error"]["Code"] == "InvalidAccessKeyId"
            assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 403
            break
        assert time.monotonic() < deadline, "credentials still accepted long after expiry"
        time.sleep(1)  # waiting out the credential lifetime is the point of this test
    assert datetime.now(UTC) >= expiration


# -- fault injection --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["500", "401", "403"])
def test_fault_error_modes(local: Local, fault: Callable[[str], None], mode: str) -> None:
    fault(mode)
    assert call(local.api_url, "/_local/fault", method="GET")[:2] == (200, {"mode": mode})
    status, body, _ = call(local.api_url, key=local.key("acme/"))
    assert status == int(mode)
    assert_error_body(body, status)


def test_fault_malformed_then_ok_restores(local: Local, fault: Callable[[str], None]) -> None:
    fault("malformed")
    status, body, _ = call(local.api_url, key=local.key("globex/"))
    assert status == 200
    assert set(body["credentials"]) == CREDENTIAL_FIELDS - {"aws_session_token"}
    assert body["bucket_info"]["prefix"] == "globex/"
    fault("ok")
    assert set(fetch(local)["credentials"]) == CREDENTIAL_FIELDS


def test_fault_hang_answers_once_mode_changes(local: Local, fault: Callable[[str], None]) -> None:
    fault("hang")
    result: list[int] = []
    thread = threading.Thread(
        target=lambda: result.append(call(local.api_url, key=local.key("acme/"))[0]), daemon=True
    )
    thread.start()
    thread.join(timeout=1.0)
    assert thread.is_alive() and not result, "a hanging endpoint answered"
    fault("ok")
    thread.join(timeout=30)
    assert result == [200]


def test_fault_rejects_unknown_mode(local: Local) -> None:
    assert call(local.api_url, "/_local/fault", data={"mode": "explode"})[0] == 400
    assert call(local.api_url, "/_local/fault", data=None)[0] == 400
    assert call(local.api_url, "/_local/fault", method="GET")[1] == {"mode": "ok"}


def test_s3_down_refuses_connections_and_up_brings_back_the_same_endpoint_and_data(
    local: Local,
) -> None:
    s3 = admin_s3(local)
    key = f"acme/outage-{uuid.uuid4().hex}"
    s3.put_object(Bucket=local.info["bucket"], Key=key, Body=b"kept")
    old_weed = weed_pid(local)
    assert call(local.api_url, "/_local/s3", data={"state": "down"}, timeout=60)[:2] == (
        200,
        {"state": "down"},
    )
    try:
        unreachable = boto3.session.Session().client(
            "s3",
            endpoint_url=local.info["s3_endpoint"],
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}),
            **local.info["admin"],
        )
        with pytest.raises(botocore.exceptions.EndpointConnectionError):
            unreachable.get_object(Bucket=local.info["bucket"], Key=key)
        assert local.proc.poll() is None  # the server stays up while S3 is down
    finally:
        status = call(local.api_url, "/_local/s3", data={"state": "up"}, timeout=120)[0]
    assert status == 200
    assert weed_pid(local) != old_weed
    body = s3.get_object(Bucket=local.info["bucket"], Key=key)["Body"].read()
    assert body == b"kept"
    creds = fetch(local)  # STS works again too
    assert s3_for(local, creds).get_object(Bucket=local.info["bucket"], Key=key)["Body"].read() == b"kept"
    assert call(local.api_url, "/_local/s3", data={"state": "sideways"})[0] == 400


# -- hygiene ----------------------------------------------------------------------------------


def test_no_secret_in_logs_and_files_private(local: Local) -> None:
    creds = fetch(local)["credentials"]
    secrets = [
        creds["aws_key_id"],
        creds["aws_secret_access_key"],
        creds["aws_session_token"],
        local.info["admin"]["aws_access_key_id"],
        local.info["admin"]["aws_secret_access_key"],
        local.info["forbidden_api_key"],
    ] + [o["api_key"] for o in local.info["orgs"]]
    logs = (local.state_dir / "weed.log").read_text() + local.stderr_path.read_text()
    assert "ready" in logs
    for secret in secrets:
        assert secret not in logs

    assert (local.state_dir / "api-key").read_text() == local.info["api_key"] + "\n"
    assert local.info["api_key"] == local.key("acme/") and local.info["prefix"] == "acme/"
    assert local.state_dir.stat().st_mode & 0o777 == 0o700
    for name in ("local.json", "api-key", "secrets.json", "s3.json", "iam.json"):
        assert (local.state_dir / name).stat().st_mode & 0o777 == 0o600, name


def _listening_sockets(pid: int) -> list[tuple[str, str, int]]:
    """(family, hex local address, port) of the TCP sockets `pid` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = []
    for family in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{family}").read_text().splitlines()[1:]:
            fields = line.split()
            address, port = fields[1].split(":")
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.append((family, address, int(port, 16)))
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


def test_everything_listens_on_loopback_only(local: Local) -> None:
    weed = _listening_sockets(weed_pid(local))
    assert len(weed) >= 5
    api = _listening_sockets(local.proc.pid)
    assert len(api) == 1
    for family, address, port in weed + api:
        assert address in LOOPBACK, (family, address, port)


# -- lifecycle --------------------------------------------------------------------------------


def test_restart_keeps_keys_and_data_then_stops_cleanly(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    first = start_server(state_dir, 3600)
    try:
        body = fetch(first)
        bucket = body["bucket_info"]["name"]
        s3_for(first, body).put_object(Bucket=bucket, Key="acme/Incoming/kept.txt", Body=b"kept")
        weed = weed_pid(first)
    finally:
        code = stop_server(first.proc)
    assert code == 0
    assert not (state_dir / "local.json").exists()
    assert not pid_alive(weed)
    assert leftover_sockets(state_dir) == []

    (state_dir / "local.json").write_text(json.dumps(first.info))  # stale: must be ignored
    second = start_server(state_dir, 3600)
    try:
        assert second.info["orgs"] == first.info["orgs"]
        assert second.info["admin"] == first.info["admin"]
        s3 = s3_for(second, fetch(second))
        assert s3.get_object(Bucket=bucket, Key="acme/Incoming/kept.txt")["Body"].read() == b"kept"
        weed = weed_pid(second)
        second.proc.kill()  # no cleanup possible: weed must still go (parent-death signal)
        second.proc.wait()
        wait_until(lambda: not pid_alive(weed), 30, "weed to exit after its parent was killed")
    finally:
        stop_server(second.proc)
    # weed could not clean its /tmp sockets; the next start on this state dir does, once
    # nothing listens on them any more (the kernel closes them a moment after the exit).
    ports = json.loads((state_dir / "seaweed" / PORTS_RECORD).read_text())
    wait_until(lambda: not _sockets_listening(ports), 30, "the killed weed's sockets to close")
    forget_previous_run(state_dir / "seaweed")
    assert leftover_sockets(ports) == []


def _sockets_listening(ports: list[int]) -> bool:
    for path in leftover_sockets(ports):
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(path))
            except OSError:
                continue
        return True
    return False


def leftover_sockets(where: Path | list[int]) -> list[Path]:
    """The /tmp/seaweedfs-*.sock files named after the ports of a (stopped) weed."""
    if isinstance(where, Path):
        where = json.loads((where / "seaweed" / PORTS_RECORD).read_text())
    numbers = {n for p in where for n in (p, p + 10000)}
    found = Path("/tmp").glob("seaweedfs-*.sock")
    return [s for s in found if int(s.stem.rsplit("-", 1)[1]) in numbers]


def test_second_server_on_same_state_dir_is_refused(local: Local) -> None:
    other = subprocess.run(
        [sys.executable, "-m", "minerva_mount.local.server", "--state-dir", str(local.state_dir)],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert other.returncode == 1
    assert "already running" in other.stderr
    assert _read_local_json(local.state_dir) == local.info


def _spawn_bare(state_dir: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "minerva_mount.local.server", "--state-dir", str(state_dir)],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_for_weed_child(proc: subprocess.Popen[bytes]) -> int:
    found: list[int] = []

    def spawned() -> bool:
        assert proc.poll() is None, "server exited early"
        found[:] = [p for p in child_pids(proc.pid) if _comm(p) == "weed"]
        return bool(found)

    wait_until(spawned, START_DEADLINE, "weed to be started")
    return found[0]


def test_sigterm_during_startup_stops_everything(tmp_path: Path) -> None:
    proc = _spawn_bare(tmp_path / "state")
    try:
        weed = _wait_for_weed_child(proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=STOP_DEADLINE) == 0
    finally:
        stop_server(proc)
    assert not pid_alive(weed)
    assert not (tmp_path / "state" / "local.json").exists()


def test_weed_dying_makes_server_exit_nonzero(tmp_path: Path) -> None:
    server = start_server(tmp_path / "state", 3600)
    try:
        os.kill(weed_pid(server), signal.SIGKILL)
        assert server.proc.wait(timeout=STOP_DEADLINE) == 1
    finally:
        stop_server(server.proc)
    assert "weed exited unexpectedly" in server.stderr_path.read_text()
    assert not (tmp_path / "state" / "local.json").exists()
