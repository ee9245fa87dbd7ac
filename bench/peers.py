"""The local Minerva and the three mounts compared side by side: minerva-mount, s3fs-fuse, rclone.

Every process is started in its own session, so a Ctrl-C reaches the benchmark alone, which then
unmounts and stops everything itself, by pid, in reverse order (see `Cleanup`). Secrets reach
s3fs through a 0600 passwd file and rclone through its environment, never argv.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import botocore.config

from minerva_mount.local.procs import stop_process, wait_for

REPO = Path(__file__).resolve().parent.parent

#: s3fs: parts and parallelism matched to boto3's TransferConfig defaults (8 MiB, 10 threads);
#: s3fs' own defaults are 10 MB parts, 5 in parallel. Listing parallelism (multireq_max=20)
#: and the stat cache (100,000 entries, 900 s) are left at their defaults.
S3FS_OPTS = ("parallel_count=10", "multipart_size=8")

#: rclone: --use-server-modtime takes mtime from the listing instead of one HEAD per file, as
#: minerva-mount does; chunks and upload concurrency as for s3fs.
RCLONE_COMMON = ("--use-server-modtime", "--s3-chunk-size", "8M", "--s3-upload-concurrency", "10")
#: Reads: no VFS cache (rclone streams with its 16 MiB --buffer-size and chunked reads).
RCLONE_READ = ("--vfs-cache-mode", "off")
#: Writes: `writes` is the mode rclone documents for applications that write; uploads start
#: at once after close (--vfs-write-back 0s, default 5 s) and the benchmark waits for them.
RCLONE_WRITE = ("--vfs-cache-mode", "writes", "--vfs-write-back", "0s")





def mounted(path: Path) -> bool:
    """Also true for a FUSE mount whose daemon died ("Transport endpoint is not connected"),
    which os.path.ismount misses: its lstat fails."""
    if os.path.ismount(path):
        return True
    try:
        with open("/proc/self/mounts") as f:
            return any(line.split()[1] == str(path) for line in f)
    except OSError:
        return False


def fuse_unmount(path: Path, lazy: bool = False) -> None:
    if mounted(path):
        flags = "-uz" if lazy else "-u"
        subprocess.run(["fusermount3", flags, str(path)], check=False, capture_output=True)


class Cleanup:
    """Everything started, stopped in reverse order by `close()` (also on failure or Ctrl-C)."""

    def __init__(self) -> None:
        self._items: list[object] = []

    def add(self, item):
        self._items.append(item)
        return item

    def discard(self, item) -> None:
        if item in self._items:
            self._items.remove(item)

    def close(self) -> None:
        while self._items:
            item = self._items.pop()
            try:
                if isinstance(item, Mount):
                    item.unmount()
                elif isinstance(item, subprocess.Popen):
                    stop_process(item)
            except Exception as e:  # keep cleaning up the rest
                print(f"bench: cleanup of {item}: {e}", file=sys.stderr)


@dataclass
class Server:
    """The local Minerva started by the benchmark (`python -m minerva_mount.local.server`)."""

    state_dir: Path
    info: dict
    proc: subprocess.Popen

    @property
    def bucket(self) -> str:
        return self.info["bucket"]

    @property
    def prefix(self) -> str:
        return self.info["prefix"]

    @property
    def endpoint(self) -> str:
        return self.info["s3_endpoint"]

    def admin(self, pool: int = 32):
        admin = self.info["admin"]
        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=self.info.get("region", "us-east-1"),
            aws_access_key_id=admin["aws_access_key_id"],
            aws_secret_access_key=admin["aws_secret_access_key"],
            config=botocore.config.Config(
                s3={"addressing_style": "path"}, max_pool_connections=pool,
                retries={"max_attempts": 3}))


def start_server(work: Path, cleanup: Cleanup) -> Server:
    state = work / "minerva-state"
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(work / "server.log", "wb") as log:
        proc = cleanup.add(subprocess.Popen(
            [sys.executable, "-m", "minerva_mount.local.server", "--state-dir", str(state)],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True))
    local_json = state / "local.json"

    def ready():
        if proc.poll() is not None:
            raise RuntimeError(f"local Minerva exited {proc.returncode}; see {work / 'server.log'}")
        return local_json.exists() and json.loads(local_json.read_text())

    info = wait_for(ready, "the local Minerva to write local.json", timeout=180, interval=0.2)
    return Server(state, info, proc)


@dataclass
class Mount:
    """One live mount: its root shows the org's area (Incoming/, Outgoing/)."""

    name: str
    path: Path
    proc: subprocess.Popen
    log: Path

    def unmount(self) -> None:
        """As a user would (fusermount3 -u; the daemon then exits); if the mount is busy or the
        daemon does not exit, SIGTERM it and detach the mount lazily."""
        if mounted(self.path):
            done = subprocess.run(["fusermount3", "-u", str(self.path)], capture_output=True)
            if done.returncode:
                stop_process(self.proc, 10)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            stop_process(self.proc, 10)
        fuse_unmount(self.path, lazy=True)

    def abort(self) -> None:
        """After a hung workload: kill the daemon so blocked calls return, then detach."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        fuse_unmount(self.path, lazy=True)

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])


@dataclass
class Peer:
    """A FUSE client to compare; `mount()` starts a fresh instance (empty caches)."""

    name: str
    server: Server
    work: Path
    cleanup: Cleanup
    extra: tuple[str, ...] = ()
    count: int = field(default=0, init=False)
    #: Where the command runs: for minerva-mount, whose `python -m minerva_mount` imports the
    #: package from there (bench/wan.py points it at an export of a commit).
    cwd: Path = field(default=REPO, init=False)
    notes: list[str] = field(default_factory=list, init=False)

    def command(self, path: Path, run_dir: Path) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def mount(self, mode: str = "read") -> Mount:
        self.count += 1
        tag = f"{self.name}-{self.count}"
        path = self.work / "mnt" / tag
        run_dir = self.work / "run" / tag
        path.mkdir(parents=True)
        run_dir.mkdir(parents=True)
        self.mode = mode
        argv, env = self.command(path, run_dir)
        log = run_dir / "log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.cwd,
                                    start_new_session=True)
        mount = self.cleanup.add(Mount(self.name, path, proc, log))

        def live():
            if proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {proc.returncode} at mount: {mount.log_tail()}")
            return os.path.ismount(path)

        try:
            wait_for(live, f"{self.name} to mount", timeout=60)
            # The area is visible (the first listing answered) before anything is timed.
            wait_for(lambda: "Outgoing" in os.listdir(path), f"{self.name} to show Outgoing/", 60)
        except BaseException:
            self.release(mount)
            raise
        return mount

    def release(self, mount: Mount, abort: bool = False) -> None:
        try:
            mount.abort() if abort else mount.unmount()
        finally:
            self.cleanup.discard(mount)

    def describe(self) -> str:
        return " ".join(self.command_for_display())

    def command_for_display(self) -> list[str]:
        argv, _ = self.command(Path("MNT"), self.work / "run" / "RUN")
        return argv


class MinervaPeer(Peer):
    def __init__(self, server, work, cleanup, extra=(), src: Path = REPO):
        super().__init__("minerva-mount", server, work, cleanup, tuple(extra))
        self.cwd = src
        helptext = subprocess.run([sys.executable, "-m", "minerva_mount", "--help"], cwd=src,
                                  capture_output=True, text=True).stdout
        self.fresh_cache = "--cache-dir" in helptext and "--cache-dir" not in self.extra
        if self.fresh_cache:
            self.notes.append("fresh --cache-dir per mount (every cold run starts with an empty cache)")
        else:
            self.notes.append("no --cache-dir flag in this checkout" if "--cache-dir" not in helptext
                              else "--cache-dir given by the user")

    def command(self, path, run_dir):
        info = self.server.info
        argv = [sys.executable, "-m", "minerva_mount", str(path), "--foreground",
                "--api-url", info["api_url"], "--api-key-file", str(self.server.state_dir / "api-key"),
                "--s3-endpoint-url", info["s3_endpoint"]]
        if self.fresh_cache:
            argv += ["--cache-dir", str(run_dir / "cache")]
        # The user's own settings (config file, MINERVA_* variables) never reach the benchmark.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MINERVA_")}
        env["XDG_CONFIG_HOME"] = str(self.work / "xdg-config")
        return argv + list(self.extra), env


class S3fsPeer(Peer):
    def __init__(self, server, work, cleanup, extra=()):
        super().__init__("s3fs", server, work, cleanup, tuple(extra))
        admin = server.info["admin"]
        self.passwd = work / "s3fs-passwd"
        fd = os.open(self.passwd, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{admin['aws_access_key_id']}:{admin['aws_secret_access_key']}\n")
        self.notes.append("-o " + ",".join(S3FS_OPTS) + " (boto3's part size and parallelism); "
                          "no use_cache (s3fs' default)")

    def command(self, path, run_dir):
        opts = [f"url={self.server.endpoint}", "use_path_request_style", f"passwd_file={self.passwd}",
                f"endpoint={self.server.info.get('region', 'us-east-1')}", *S3FS_OPTS]
        argv = ["s3fs", f"{self.server.bucket}:/{self.server.prefix.rstrip('/')}", str(path), "-f"]
        for opt in opts:
            argv += ["-o", opt]
        return argv + list(self.extra), dict(os.environ)


class RclonePeer(Peer):
    def __init__(self, server, work, cleanup, extra=()):
        super().__init__("rclone", server, work, cleanup, tuple(extra))
        self.mode = "read"
        self.notes.append("reads: " + " ".join(RCLONE_READ) + "; writes: " + " ".join(RCLONE_WRITE)
                          + "; both: " + " ".join(RCLONE_COMMON) + "; provider SeaweedFS")

    def command(self, path, run_dir):
        admin = self.server.info["admin"]
        env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}  # rclone 1.60 refuses it
        env.update({
            "RCLONE_CONFIG": str(self.work / "rclone.conf"),  # absent: no user config is read
            "RCLONE_CONFIG_BENCHS3_TYPE": "s3",
            "RCLONE_CONFIG_BENCHS3_PROVIDER": "SeaweedFS",
            "RCLONE_CONFIG_BENCHS3_ENDPOINT": self.server.endpoint,
            "RCLONE_CONFIG_BENCHS3_REGION": self.server.info.get("region", "us-east-1"),
            "RCLONE_CONFIG_BENCHS3_ACCESS_KEY_ID": admin["aws_access_key_id"],
            "RCLONE_CONFIG_BENCHS3_SECRET_ACCESS_KEY": admin["aws_secret_access_key"],
        })
        mode = RCLONE_WRITE if getattr(self, "mode", "read") == "write" else RCLONE_READ
        argv = ["rclone", "mount", f"benchs3:{self.server.bucket}/{self.server.prefix.rstrip('/')}",
                str(path), *RCLONE_COMMON, *mode, "--cache-dir", str(run_dir / "cache")]
        return argv + list(self.extra), env


def split_flags(text: str | None) -> tuple[str, ...]:
    return tuple(shlex.split(text)) if text else ()
