"""Helpers shared by the tests: the local Minerva, real FUSE mounts, polling with a deadline.

The mount always runs in a subprocess: pyfuse3 keeps its session in module globals, and a
process must never serve a mount it also uses. Everything started here is stopped by pid,
and every mount unmounted with fusermount3, also when a test fails.
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import boto3
import botocore.config

from minerva_mount.local.procs import stop_process, wait_for  # noqa: F401 (tests import them from here)


def s3_client(endpoint: str, key_id: str, secret: str, token: str | None = None):
    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key_id,
        aws_secret_access_key=secret, aws_session_token=token,
        config=botocore.config.Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))


@dataclass
class LocalMinerva:
    state_dir: Path
    info: dict
    proc: subprocess.Popen

    @property
    def api_url(self) -> str:
        return self.info["api_url"]

    @property
    def prefix(self) -> str:
        return self.info["prefix"]

    @property
    def bucket(self) -> str:
        return self.info["bucket"]

    def admin(self):
        admin = self.info["admin"]
        return s3_client(self.info["s3_endpoint"], admin["aws_access_key_id"],
                         admin["aws_secret_access_key"])

    def key_file(self, key: str, name: str = "key") -> Path:
        path = self.state_dir / f"test-{name}"
        path.write_text(key + "\n")
        path.chmod(0o600)
        return path

    def keys(self, prefix: str = "") -> list[str]:
        """Every key under the org prefix + `prefix`, as a pipeline with admin access sees it."""
        found = []
        for page in self.admin().get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix):
            found += [o["Key"][len(self.prefix):] for o in page.get("Contents", [])]
        return found

    def get(self, path: str) -> bytes:
        return self.admin().get_object(Bucket=self.bucket, Key=self.prefix + path)["Body"].read()

    def put(self, path: str, data: bytes) -> None:
        self.admin().put_object(Bucket=self.bucket, Key=self.prefix + path, Body=data)

    def _control(self, route: str, body: dict) -> None:
        request = urllib.request.Request(self.api_url + route, data=json.dumps(body).encode(),
                                         method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as answer:
            assert answer.status == 200

    def fault(self, mode: str) -> None:
        """How the credential endpoint answers from now on: ok, 500, 401, 403, malformed, hang."""
        self._control("/_local/fault", {"mode": mode})

    def s3(self, state: str) -> None:
        """Take the S3 server "down" (weed stopped) or back "up" (same ports, same data)."""
        self._control("/_local/s3", {"state": state})

    def wipe(self) -> None:
        """Delete every object of every org, and the folders SeaweedFS keeps once emptied."""
        admin = self.admin()
        paginator = admin.get_paginator("list_objects_v2")
        for prefix in (o["prefix"] for o in self.info["orgs"]):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    admin.delete_object(Bucket=self.bucket, Key=obj["Key"])
            # An emptied folder stays listed (as a common prefix) until its 'folder/' key is
            # deleted; deepest first, so each parent is empty when its turn comes.
            for folder in sorted(self._folders(admin, prefix), key=len, reverse=True):
                admin.delete_object(Bucket=self.bucket, Key=folder)

    def _folders(self, admin, prefix: str) -> list[str]:
        found = []
        for page in admin.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, Delimiter="/"):
            for sub in page.get("CommonPrefixes", []):
                found += [sub["Prefix"], *self._folders(admin, sub["Prefix"])]
        return found


@contextlib.contextmanager
def running_local_minerva(state: Path, *args: str):
    """A local Minerva server (extra `args`, e.g. --credential-lifetime 20), stopped by pid."""
    with open(state / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "minerva_mount.local.server", "--state-dir", str(state), *args],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        local_json = state / "local.json"

        def ready():
            assert proc.poll() is None, f"local Minerva exited; see {state / 'server.log'}"
            return local_json.exists() and json.loads(local_json.read_text())
        info = wait_for(ready, "the local Minerva to write local.json", timeout=120)
        yield LocalMinerva(state, info, proc)
    finally:
        stop_process(proc)
        shutil.rmtree(state / "seaweed", ignore_errors=True)  # the objects; logs stay for a look


@contextlib.contextmanager
def local_minerva_with_lifetime(tmp_path_factory, lifetime: int):
    """A second local Minerva whose credentials live `lifetime` seconds; faults off at the end."""
    with running_local_minerva(tmp_path_factory.mktemp(f"lifetime-{lifetime}"),
                               "--credential-lifetime", str(lifetime)) as local:
        yield local
        local.fault("ok")


@dataclass
class Mount:
    path: Path
    proc: subprocess.Popen
    log_file: Path

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def unmount(self) -> int:
        """Unmount as a user would and return the daemon's exit code."""
        if os.path.ismount(self.path):
            subprocess.run(["fusermount3", "-u", str(self.path)], check=False, capture_output=True)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            subprocess.run(["fusermount3", "-u", "-z", str(self.path)], check=False, capture_output=True)
            raise


def start_mount(local: LocalMinerva, path: Path, log_file: Path, key: str | None = None,
                extra: tuple[str, ...] = ()) -> subprocess.Popen:
    with contextlib.suppress(FileExistsError):  # also a dead mount left by a killed daemon
        path.mkdir()
    key_file = local.key_file(key or local.info["api_key"], name=path.name)
    return subprocess.Popen(
        [sys.executable, "-m", "minerva_mount", str(path), "--foreground",
         "--api-url", local.api_url, "--api-key-file", str(key_file),
         "--s3-endpoint-url", local.info["s3_endpoint"], "--log-file", str(log_file), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


MOUNT_LOGS: list[Path] = []  # every mount's log, scanned for AccessDenied at the end


