"""Where the CPU of a cold sequential read goes, in core-seconds per GiB (a benchmark, not a test).

On a small machine a cold read through the mount is CPU-bound: the S3 server, the kernel's FUSE
and socket paths, the daemon and the reading program share the cores. This script puts one
1 GiB object in its own local Minerva and reads it, page cache dropped before each round:

- `boto3`: one GET stream read in 1 MiB chunks (no FUSE): what the server itself costs;
- `null-fuse`: `dd` from a pyfuse3 file system that answers every read with a view of one
  buffer in memory (no S3, no copy in Python): the floor of any pyfuse3 daemon on this machine;
- `minerva-mount`: `dd` from a fresh mount with a fresh block cache;
- `s3fs`: `dd` from a fresh s3fs-fuse mount, configured as in bench/run.py (if installed).

For each it prints MB/s and core-seconds per GiB: the whole machine (from /proc/stat), the S3
server (weed) and the client process (daemon, or boto3's). Run as root (drop_caches):

    sudo .venv/bin/python bench/cpu_budget.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402
import workloads as w  # noqa: E402

from minerva_mount.local.procs import wait_for  # noqa: E402

GIB = 1 << 30
HZ = os.sysconf("SC_CLK_TCK")

NULL_FS = '''
import errno, os, stat, sys
import pyfuse3, trio
SIZE, BUF = 1 << 30, memoryview(os.urandom(2 << 20))
class Null(pyfuse3.Operations):
    async def getattr(self, inode, ctx=None):
        e = pyfuse3.EntryAttributes()
        e.st_ino, e.attr_timeout, e.entry_timeout = inode, 300, 300
        if inode == pyfuse3.ROOT_INODE:
            e.st_mode = stat.S_IFDIR | 0o755
        elif inode == 2:
            e.st_mode, e.st_size = stat.S_IFREG | 0o644, SIZE
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return e
    async def lookup(self, parent, name, ctx=None):
        if parent == pyfuse3.ROOT_INODE and name == b"big.bin":
            return await self.getattr(2)
        raise pyfuse3.FUSEError(errno.ENOENT)
    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)
    async def read(self, fh, off, size):
        start = off % (1 << 20)
        return BUF[start:start + max(0, min(size, SIZE - off))]
pyfuse3.init(Null(), sys.argv[1], set(pyfuse3.default_options) | {"fsname=nullfs"})
try:
    trio.run(pyfuse3.main)
finally:
    pyfuse3.close()
'''


def busy_ticks() -> int:
    """Ticks the machine spent on anything but idle and iowait."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal, *_ = (int(v) for v in f.readline().split()[1:])
    return user + nice + system + irq + softirq + steal


def process_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def measure(label: str, run, client_pid: int | None, weed_pid: int) -> dict:
    w.drop_caches()
    before = (busy_ticks(), process_ticks(weed_pid), process_ticks(client_pid or os.getpid()),
              time.perf_counter())
    size = run()
    after = (busy_ticks(), process_ticks(weed_pid), process_ticks(client_pid or os.getpid()),
             time.perf_counter())
    gib = size / GIB
    row = {"what": label, "MB/s": size / (after[3] - before[3]) / 1e6,
           "machine": (after[0] - before[0]) / HZ / gib, "weed": (after[1] - before[1]) / HZ / gib,
           "client": (after[2] - before[2]) / HZ / gib}
    print(f"{label:14} {row['MB/s']:7.1f} MB/s   core-s per GiB: machine {row['machine']:.2f}  "
          f"weed {row['weed']:.2f}  client {row['client']:.2f}", flush=True)
    return row


def dd(path: Path) -> int:
    out = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], check=True,
                         capture_output=True, text=True).stderr
    return int(out.split(" bytes", 1)[0].rsplit("\n", 1)[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cleanup = peers.Cleanup()
    work = Path(tempfile.mkdtemp(prefix="minerva-cpu-", dir="/var/tmp"))
    try:
        server = peers.start_server(work, cleanup)
        weed = int(subprocess.run(["pgrep", "-f", f"weed.*{server.state_dir}"], capture_output=True,
                                  text=True).stdout.split()[0])
        data = work / "big.bin"
        with open(data, "wb") as f:
            for _ in range(1024):
                f.write(os.urandom(1 << 20))
        key = server.prefix + "Outgoing/big.bin"
        server.admin().upload_file(str(data), server.bucket, key)
        data.unlink()
        (work / "null").mkdir()
        mounts = [peers.MinervaPeer(server, work, cleanup)]
        if shutil.which("s3fs"):
            mounts.append(peers.S3fsPeer(server, work, cleanup))
        print(f"{os.cpu_count()} CPUs; 1 GiB object, page cache dropped before each read", flush=True)
        for _ in range(args.rounds):
            measure("boto3", lambda: w.get_stream(server.admin(), server.bucket, key), None, weed)
            null = cleanup.add(subprocess.Popen([sys.executable, "-c", NULL_FS, str(work / "null")],
                                                start_new_session=True))
            wait_for(lambda: os.path.ismount(work / "null"), "the null file system to mount", timeout=30)
            measure("null-fuse", lambda: dd(work / "null" / "big.bin"), null.pid, weed)
            peers.fuse_unmount(work / "null")
            null.wait(30)
            cleanup.discard(null)
            for peer in mounts:
                mount = peer.mount()
                try:
                    path = mount.path / "Outgoing" / "big.bin"
                    measure(peer.name, lambda path=path: dd(path), mount.proc.pid, weed)
                finally:
                    peer.release(mount)
    finally:
        cleanup.close()
        w.remove_tree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
