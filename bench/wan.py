#!/usr/bin/env python3
"""WAN benchmark (issue 12): every tool's S3 endpoint behind bench/wanproxy.py, 40 and 100 ms RTT.

One command starts its own local Minerva (SeaweedFS on 127.0.0.1), puts the objects with the
admin keys directly, then for each round trip time starts `wanproxy.py` (RTT split evenly
between the two directions, one token bucket per direction shared by all connections) in front
of the S3 endpoint and runs issue 12's workloads through it with raw boto3, minerva-mount,
s3fs and rclone in turn, each cell on a fresh mount. Writes are timed when the command returned
and when every object is complete in S3, seen by an admin listing that goes to the server
directly (not through the proxy, so it neither waits on the link nor adds to the counts). The
proxy counts the HTTP requests of each cell by method and S3 kind; for minerva-mount the
daemon's own counts (`getfattr -n user.minerva.requests`) are kept too.

    sudo .venv/bin/python bench/wan.py                        # 40 and 100 ms, 400 Mbit/s
    sudo .venv/bin/python bench/wan.py --rtt-ms 40 --rounds 2
    sudo .venv/bin/python bench/wan.py --quick                # small sizes, a few minutes

Results: printed, and bench/results/wan-latest.json (+ wan-<UTC time>.json). Not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402
import wanproxy  # noqa: E402
import workloads as w  # noqa: E402
from boto3.s3.transfer import TransferConfig  # noqa: E402
from run import machine  # noqa: E402

BENCH = Path(__file__).resolve().parent
MiB, KiB = w.MiB, w.KiB
TOOLS = ("boto3", "minerva-mount", "minerva-mount-wb", "s3fs", "rclone", "rclone-5s")
COLUMNS = ("minerva-mount", "minerva-mount-wb", "s3fs", "rclone", "rclone-5s", "boto3", "boto3-16")
#: Workloads of the write-back column (minerva-mount --write-back, when the checkout has it).
WRITE_BACK = {"cp_r", "gio", "cp_big"}
#: Workloads of the extra rclone column: gio copy fails with --vfs-write-back 0s (see README).
RCLONE_5S = {"gio"}


class Rclone5s(peers.RclonePeer):
    """rclone mount with its default write-back delay (5 s) instead of 0 s: for `gio copy`,
    which sets the mtime after close; with 0 s rclone has started the upload by then, aborts
    it ("source file is being updated") and the file never arrives."""

    def __init__(self, server, work, cleanup, extra=()):
        super().__init__(server, work, cleanup, (*extra, "--vfs-write-back", "5s"))
        self.name = "rclone-5s"


@dataclasses.dataclass(frozen=True)
class Sizes:
    small_files: int = 200  # cp -r and gio copy
    small_kib: int = 16
    big_write_mib: int = 512  # cp
    list_count: int = 2000  # ls -l
    read_mib: int = 512  # dd
    head_files: int = 100  # first 64 KiB of each
    head_file_mib: int = 2
    head_kib: int = 64
    huge_mib: int = 1024  # head -c 1


QUICK = Sizes(small_files=40, big_write_mib=64, list_count=500, read_mib=64, head_files=20, huge_mib=256)

#: The issue's figures for minerva-mount at main 0c1f342 ("today"), seconds: what the
#: targets compare with. 40 ms: the worse of its two rounds; 100 ms: its one round.
BEFORE = {
    40: {"cp_r": 20.1, "gio": 22.1, "cp_big": 12.0, "ls_cold": 0.52, "ls_warm": 0.02, "dd": 11.8,
         "heads": 5.7, "head1": 0.39},
    100: {"cp_r": 44.0, "ls_cold": 0.90, "heads": 12.5, "head1": 0.73},
}


def workload_rows(s: Sizes) -> list[dict]:
    big = lambda mib: f"{mib} MiB" if mib < 1024 else f"{mib // 1024} GiB"  # noqa: E731
    rows = [
        ("cp_r", "write", f"cp -r of {s.small_files} x {s.small_kib} KiB, until all in S3"),
        ("gio", "write", f"gio copy of the {s.small_files}, one process per file, until all in S3"),
        ("cp_big", "write", f"cp of {big(s.big_write_mib)}, until complete in S3"),
        ("ls_cold", "read", f"ls -l of {s.list_count} objects, cold"),
        ("ls_warm", "read", f"ls -l of {s.list_count} objects, warm"),
        ("dd", "read", f"dd {big(s.read_mib)} cold read"),
        ("heads", "read", f"first {s.head_kib} KiB of {s.head_files} x {s.head_file_mib} MiB files"),
        ("head1", "read", f"head -c 1 of a {big(s.huge_mib)} file, fresh mount"),
    ]
    return [{"id": i, "kind": k, "title": t} for i, k, t in rows]


class Layout:
    """Objects under the org prefix (the mount root) and their local copies (in /dev/shm)."""

    def __init__(self, sizes: Sizes, data: Path):
        self.sizes, self.data = sizes, data
        self.list_dir = f"Outgoing/wan/list-{sizes.list_count}"
        self.read = "Outgoing/wan/read.bin"
        self.heads = [f"Outgoing/wan/heads/h{i:03d}.bin" for i in range(sizes.head_files)]
        self.huge = "Outgoing/wan/deep/er/huge.bin"  # four levels down: a fresh mount walks them
        self.small_dir = data / "small"
        self.big_write = data / "big-write.bin"

    def local(self, rel: str) -> Path:
        return self.data / rel

    def make(self) -> None:
        s = self.sizes
        w._write_random(self.local(self.read), s.read_mib * MiB, 11)
        w._write_random(self.local(self.huge), s.huge_mib * MiB, 12)
        for i, rel in enumerate(self.heads):
            w._write_random(self.local(rel), s.head_file_mib * MiB, 2000 + i)
        w._write_random(self.big_write, s.big_write_mib * MiB, 13)
        self.small_dir.mkdir(parents=True, exist_ok=True)
        for i in range(s.small_files):
            w._write_random(self.small_dir / f"f{i:04d}.dat", s.small_kib * KiB, 300_000 + i)

    def put(self, server) -> None:
        client, bucket, prefix = server.admin(32), server.bucket, server.prefix
        for rel in (self.read, self.huge):
            client.upload_file(str(self.local(rel)), bucket, prefix + rel,
                               Config=TransferConfig(max_concurrency=10))
        jobs = [(prefix + rel, self.local(rel).read_bytes()) for rel in self.heads]
        jobs.append((prefix + "Incoming/keep.txt", b"keeps Incoming/ visible to s3fs and rclone\n"))
        jobs += [(f"{prefix}{self.list_dir}/f{i:05d}.txt", b"x" * 100) for i in range(self.sizes.list_count)]
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda job: client.put_object(Bucket=bucket, Key=job[0], Body=job[1]), jobs))


class Cut(Exception):
    """A cell past its deadline: the command was killed (and the mount aborted)."""


class Wan:
    def __init__(self, args, sizes: Sizes, work: Path, data: Path):
        self.args, self.sizes, self.work = args, sizes, work
        self.layout = Layout(sizes, data)
        self.cleanup = peers.Cleanup()
        self.rows = workload_rows(sizes)
        self.rounds: list[dict] = []
        self.start = time.monotonic()
        self.dropped = True
        self.server: peers.Server | None = None
        self.proxy: wanproxy.Started | None = None
        self.src: Path = peers.REPO

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.start:6.0f} s] {text}", flush=True)

    def drop(self) -> None:
        if not w.drop_caches():
            self.dropped = False

    # ------------------------------------------------------------ one cell
    def guarded(self, fn, timeout: float, mount: peers.Mount | None):
        return w.guarded(fn, timeout, mount, Cut)

    def cell(self, results: dict, wid: str, column: str, fn, timeout: float,
             mount: peers.Mount | None = None) -> bool:
        """Measure one cell with the proxy's counts around it; False when the mount was lost."""
        own = mount is not None and mount.name.startswith("minerva-mount")
        marks: dict = {}

        def mark() -> None:  # right before the timing starts: the counts cover the workload alone
            marks["minerva"] = minerva_requests(mount) if own else None
            self.proxy.stats("reset")

        _BEGIN[0] = mark
        mark()
        try:
            cell = self.guarded(fn, timeout, mount)
        except KeyboardInterrupt:
            w.kill_children()
            raise
        except Exception as e:
            reason = f"{type(e).__name__}: {e}".strip()
            if mount is not None and mount.proc.poll() is not None:
                reason += f" ({mount.name} exited {mount.proc.returncode}: {mount.log_tail(2)})"
            cell = {"failed": reason[:400]}
            if self.args.verbose:
                traceback.print_exc()
        counts = self.proxy.stats()
        counts.pop("settings", None)
        cell["proxy"] = counts
        before = marks["minerva"]
        if before is not None and "failed" not in cell:
            after = minerva_requests(mount)
            cell["minerva_requests"] = {k: after.get(k, 0) - before.get(k, 0)
                                        for k in sorted(after) if after.get(k, 0) != before.get(k, 0)}
        results.setdefault(wid, {})[column] = cell
        self.say(f"{wid:<8} {column:<14} {cell_text(cell):<24} {requests_text(counts)}")
        return ("failed" not in cell or mount is None
                or (mount.proc.poll() is None and os.path.ismount(mount.path)))

    def session(self, results: dict, peer: peers.Peer, steps: list[tuple], mode: str = "read") -> None:
        """A fresh mount of `peer` running steps (wid, fn(root) -> cell, timeout, drop_first)."""
        try:
            mount = peer.mount(mode)
        except KeyboardInterrupt:
            raise
        except Exception as e:
            for wid, *_ in steps:
                results.setdefault(wid, {})[peer.name] = {"failed": f"mount: {e}"[:400]}
                self.say(f"{wid:<8} {peer.name:<14} failed: mount: {e}"[:300])
            return
        try:
            for i, (wid, fn, timeout, drop_first) in enumerate(steps):
                if drop_first:
                    self.drop()
                if not self.cell(results, wid, peer.name, lambda fn=fn: fn(mount), timeout, mount):
                    for later, *_ in steps[i + 1:]:
                        results.setdefault(later, {})[peer.name] = {"failed": f"not run: mount lost in {wid}"}
                    break
        finally:
            peer.release(mount, abort=mount.proc.poll() is not None)

    # ------------------------------------------------------------ the run
    def minerva_peer(self, server, work, cleanup, extra) -> peers.MinervaPeer:
        return peers.MinervaPeer(server, work, cleanup, extra, src=self.src)

    def minerva_wb_peer(self, server, work, cleanup, extra) -> peers.MinervaPeer:
        peer = peers.MinervaPeer(server, work, cleanup, (*extra, "--write-back"), src=self.src)
        peer.name = "minerva-mount-wb"
        return peer

    def has_write_back(self) -> bool:
        out = subprocess.run([sys.executable, "-m", "minerva_mount", "--help"], cwd=self.src,
                             capture_output=True, text=True)
        return "--write-back" in out.stdout

    def export(self) -> dict:
        """The minerva-mount measured: `git archive` of --minerva-rev (the work tree is shared
        with people editing it), or the work tree itself with `--minerva-rev worktree`."""
        rev, repo = self.args.minerva_rev, str(peers.REPO)
        dirty = subprocess.run(["git", "-C", repo, "status", "--short", "--", "minerva_mount"],
                               capture_output=True, text=True).stdout.split("\n")
        dirty = [line for line in dirty if line.strip()]
        if rev == "worktree":
            self.src = peers.REPO
            return {"rev": "worktree", "commit": git_line(["log", "--oneline", "-1"]),
                    "worktree_changes": dirty}
        self.src = self.work / "minerva-src"
        self.src.mkdir()
        archive = subprocess.run(["git", "-C", repo, "archive", "--format=tar", rev, "minerva_mount"],
                                 capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(self.src)], input=archive.stdout, check=True)
        return {"rev": rev, "commit": git_line(["log", "--oneline", "-1", rev]),
                "worktree_changes_not_measured": dirty}

    def setup(self) -> None:
        self.say(f"work dir {self.work}, data in {self.layout.data}")
        self.server = peers.start_server(self.work, self.cleanup)
        self.say(f"local Minerva up: s3 {self.server.endpoint}; making the data")
        self.layout.make()
        self.layout.put(self.server)
        self.say("objects in place")

    def one_round(self, rtt: float, number: int) -> dict:
        a, s, lay, direct = self.args, self.sizes, self.layout, self.server
        upstream = direct.endpoint.split("://", 1)[-1].rstrip("/")
        log = open(self.work / f"wanproxy-{rtt:g}-{number}.log", "wb")  # noqa: SIM115 (closed below)
        self.proxy = wanproxy.start_process(upstream, rtt, a.rate_mbit, log=log)
        proc = self.cleanup.add(self.proxy.proc)
        info = dict(self.proxy.info)
        load_before = loadavg()
        self.say(f"--- RTT {rtt:g} ms, {a.rate_mbit:g} Mbit/s each way, round {number}: proxy pid "
                 f"{self.proxy.proc.pid} on {self.proxy.url}")
        proxied = peers.Server(direct.state_dir, {**direct.info, "s3_endpoint": self.proxy.url}, direct.proc)
        results: dict = {}
        tag = f"{rtt:g}ms-{number}"
        work = self.work / tag
        work.mkdir()
        scale = rtt / 40
        t_small = 60 + s.small_files * 1.5 * scale  # s3fs: ~0.45 s per file at 40 ms
        t_gio = 60 + s.small_files * 3.0 * scale
        t_big = 60 + s.big_write_mib * MiB / (a.rate_mbit * 1e6 / 8) * 4
        t_read = 60 + s.read_mib * MiB / (a.rate_mbit * 1e6 / 8) * 4
        t_ls, t_heads, t_head1 = 120 + 120 * scale * s.list_count / 2000, 60 + s.head_files * scale, 60
        makers = {"minerva-mount": (self.minerva_peer, a.minerva_flags),
                  "s3fs": (peers.S3fsPeer, a.s3fs_flags), "rclone": (peers.RclonePeer, a.rclone_flags),
                  "rclone-5s": (Rclone5s, a.rclone_flags),
                  "minerva-mount-wb": (self.minerva_wb_peer, a.minerva_flags)}
        try:
            for tool in a.tools:
                if tool == "minerva-mount-wb" and not self.has_write_back():
                    self.say("minerva-mount-wb: this checkout has no --write-back; skipped")
                    continue
                if tool == "boto3":
                    self.boto3_cells(results, proxied, tag, t_small, t_big, t_read)
                    continue
                cls, flags = makers[tool]
                peer = cls(proxied, work, self.cleanup, peers.split_flags(flags))
                wdir = f"Incoming/w-{tool}-{tag}"

                def small(m, d=wdir):
                    return cp_r(m.path, direct, lay, f"{d}/small")

                def gio(m, d=wdir):
                    return gio_copy(m.path, direct, lay, f"{d}/gio")

                def big(m, d=wdir):
                    return cp_big(m.path, direct, lay, f"{d}/big.bin")

                def listing(m):
                    return ls_l(m.path / lay.list_dir, s.list_count, t_ls)

                sessions = [  # (workloads, mode, steps: (wid, fn(mount), timeout, drop caches first))
                    ({"cp_r"}, "write", [("cp_r", small, t_small, False)]),
                    ({"gio"}, "write", [("gio", gio, t_gio, False)]),
                    ({"cp_big"}, "write", [("cp_big", big, t_big, False)]),
                    ({"ls_cold", "ls_warm"}, "read", [("ls_cold", listing, t_ls, True),
                                                      ("ls_warm", listing, t_ls, False)]),
                    ({"dd"}, "read", [("dd", lambda m: dd(m.path / lay.read, s.read_mib * MiB, t_read),
                                       t_read, True)]),
                    ({"heads"}, "read", [("heads", lambda m: heads(m.path, lay), t_heads, True)]),
                    ({"head1"}, "read", [("head1", lambda m: head1(m.path, lay), t_head1, True)]),
                ]
                only = {"rclone-5s": RCLONE_5S, "minerva-mount-wb": WRITE_BACK}.get(tool, set(a.workloads))
                wanted = set(a.workloads) & only
                for names, mode, steps in sessions:
                    if names & wanted:
                        self.session(results, peer, steps, mode)
                w.delete_prefix(direct, direct.prefix + wdir + "/")
        finally:
            self.proxy.proc.send_signal(signal.SIGTERM)
            try:
                self.proxy.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proxy.proc.kill()
                self.proxy.proc.wait()
            self.cleanup.discard(proc)
            log.close()
        self.say(f"round done; load average before {load_before}, after {loadavg()}")
        return {"rtt_ms": rtt, "round": number, "proxy": info, "load_before": load_before,
                "load_after": loadavg(), "results": results}

    def boto3_cells(self, results: dict, proxied, tag: str, t_small: float, t_big: float,
                    t_read: float) -> None:
        a, lay, direct = self.args, self.layout, self.server
        wl = set(a.workloads)
        pre = f"{direct.prefix}Incoming/w-boto3-{tag}/"
        if "cp_r" in wl:
            self.cell(results, "cp_r", "boto3", lambda: boto_files(proxied, direct, lay, pre + "s1/", 1),
                      t_small)
            self.cell(results, "cp_r", "boto3-16", lambda: boto_files(proxied, direct, lay, pre + "s16/", 16),
                      t_small)
        if "cp_big" in wl:
            self.cell(results, "cp_big", "boto3", lambda: boto_big(proxied, direct, lay, pre + "big.bin"),
                      t_big)
        if "ls_cold" in wl:
            self.cell(results, "ls_cold", "boto3", lambda: boto_list(proxied, lay), t_read)
        if "dd" in wl:
            self.cell(results, "dd", "boto3", lambda: boto_get(proxied, lay), t_read)
        if "heads" in wl:
            self.cell(results, "heads", "boto3", lambda: boto_heads(proxied, lay), t_read)
        if "head1" in wl:
            self.cell(results, "head1", "boto3", lambda: boto_first_byte(proxied, lay), t_read)
        w.delete_prefix(direct, pre)


# ---------------------------------------------------------------- workloads through a mount

#: What `begin()` calls: set by `Wan.cell` to zero the proxy's counts (and note minerva-mount's).
_BEGIN = [lambda: None]


def begin() -> None:
    """Called by each workload right before its timing starts, after its own preparation."""
    _BEGIN[0]()


def wait_all(direct, prefix: str, count: int, size: int, returned: float, stall: float = 30.0) -> None:
    """Until `count` objects of `size` are complete under prefix (an admin listing, not through
    the proxy); fails when none more arrived for `stall` seconds (an upload its tool gave up)."""
    client, seen, since = direct.admin(), -1, time.monotonic()
    while (n := w.count_complete(client, direct.bucket, prefix, size)) < count:
        if n != seen:
            seen, since = n, time.monotonic()
        elif time.monotonic() - since > stall:
            raise RuntimeError(f"the command returned after {returned:.2f} s, then {n} of {count} objects "
                               f"were in S3 and none more came for {stall:.0f} s")
        time.sleep(0.1)

def git_line(argv: list[str]) -> str:
    out = subprocess.run(["git", "-C", str(peers.REPO), *argv], capture_output=True, text=True)
    return out.stdout.strip()


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def minerva_requests(mount: peers.Mount) -> dict:
    out = subprocess.run(["getfattr", "-n", "user.minerva.requests", "--only-values", "--absolute-names",
                          str(mount.path)], capture_output=True, text=True, timeout=30)
    try:
        return json.loads(out.stdout)
    except ValueError:
        return {}


def written(start: float, returned: float, **amount) -> dict:
    """A write cell: seconds until complete in S3 (now), and until the command returned."""
    return {"seconds": round(time.perf_counter() - start, 3), "returned": round(returned, 3), **amount}


def cp_r(root: Path, direct, lay: Layout, rel: str) -> dict:
    s = lay.sizes
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    begin()
    start = time.perf_counter()
    w._run(["cp", "-r", str(lay.small_dir), str(root / rel)], 3600)
    returned = time.perf_counter() - start
    wait_all(direct, f"{direct.prefix}{rel}/", s.small_files, s.small_kib * KiB, returned)
    return written(start, returned, files=s.small_files)


def gio_copy(root: Path, direct, lay: Layout, rel: str) -> dict:
    """What a file manager does: one copy per file (here one `gio copy` process per file)."""
    s = lay.sizes
    (root / rel).mkdir(parents=True)
    files = sorted(lay.small_dir.iterdir())
    begin()
    start = time.perf_counter()
    for f in files:
        w._run(["gio", "copy", str(f), str(root / rel / f.name)], 600)
    returned = time.perf_counter() - start
    wait_all(direct, f"{direct.prefix}{rel}/", s.small_files, s.small_kib * KiB, returned)
    return written(start, returned, files=len(files))


def cp_big(root: Path, direct, lay: Layout, rel: str) -> dict:
    size = lay.sizes.big_write_mib * MiB
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cat", str(lay.big_write)], stdout=subprocess.DEVNULL, check=True)
    begin()
    start = time.perf_counter()
    w._run(["cp", str(lay.big_write), str(root / rel)], 3600)
    returned = time.perf_counter() - start
    w.wait_object(direct.admin(), direct.bucket, direct.prefix + rel, size, 3600)
    return written(start, returned, bytes=size)


def ls_l(folder: Path, count: int, timeout: float) -> dict:
    begin()
    return {"seconds": round(w.ls_l(folder, count, timeout).seconds, 3)}


def dd(path: Path, size: int, timeout: float) -> dict:
    begin()
    return {"seconds": round(w.dd_read(path, size, timeout).seconds, 3), "bytes": size}


def heads(root: Path, lay: Layout) -> dict:
    n = lay.sizes.head_kib * KiB
    expected = [lay.local(rel).read_bytes()[:n] for rel in lay.heads]
    got = []
    begin()
    start = time.perf_counter()
    for rel in lay.heads:
        with open(root / rel, "rb", buffering=0) as f:
            got.append(f.read(n))
    seconds = time.perf_counter() - start
    w._check(got == expected, "first reads returned wrong bytes")
    return {"seconds": round(seconds, 3), "files": len(got)}


def head1(root: Path, lay: Layout) -> dict:
    begin()
    start = time.perf_counter()
    out = subprocess.run(["head", "-c", "1", str(root / lay.huge)], capture_output=True, timeout=600)
    seconds = time.perf_counter() - start
    w._check(out.returncode == 0 and out.stdout == lay.local(lay.huge).read_bytes()[:1],
             f"head -c 1 exited {out.returncode}: {out.stderr.decode(errors='replace')[-200:]}")
    return {"seconds": round(seconds, 3)}


# ---------------------------------------------------------------- raw boto3 through the proxy

def warm(client, server) -> None:
    """One request first, so the timing starts with an open connection, as a mount has."""
    client.list_objects_v2(Bucket=server.bucket, Prefix=server.prefix, MaxKeys=1)


def boto_files(proxied, direct, lay: Layout, prefix: str, threads: int) -> dict:
    client, s = proxied.admin(max(threads, 10)), lay.sizes
    warm(client, proxied)
    files = sorted(lay.small_dir.iterdir())
    begin()
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda p: client.upload_file(str(p), proxied.bucket, prefix + p.name), files))
    returned = time.perf_counter() - start
    wait_all(direct, prefix, len(files), s.small_kib * KiB, returned)
    return written(start, returned, files=len(files))


def boto_big(proxied, direct, lay: Layout, key: str) -> dict:
    client, size = proxied.admin(), lay.sizes.big_write_mib * MiB
    warm(client, proxied)
    begin()
    start = time.perf_counter()
    client.upload_file(str(lay.big_write), proxied.bucket, key)  # default TransferConfig
    returned = time.perf_counter() - start
    w.wait_object(direct.admin(), direct.bucket, key, size, 600)
    return written(start, returned, bytes=size)


def boto_list(proxied, lay: Layout) -> dict:
    client = proxied.admin()
    warm(client, proxied)
    begin()
    return {"seconds": round(w.boto_list(proxied, lay.list_dir, lay.sizes.list_count).seconds, 3)}


def boto_get(proxied, lay: Layout) -> dict:
    client, size = proxied.admin(), lay.sizes.read_mib * MiB
    warm(client, proxied)
    begin()
    start = time.perf_counter()
    n = w.get_stream(client, proxied.bucket, proxied.prefix + lay.read)
    seconds = time.perf_counter() - start
    w._check(n == size, f"read {n} of {size}")
    return {"seconds": round(seconds, 3), "bytes": size}


def boto_heads(proxied, lay: Layout) -> dict:
    client, n = proxied.admin(), lay.sizes.head_kib * KiB
    warm(client, proxied)
    begin()
    start = time.perf_counter()
    got = [client.get_object(Bucket=proxied.bucket, Key=proxied.prefix + rel, Range=f"bytes=0-{n - 1}")
           ["Body"].read() for rel in lay.heads]
    seconds = time.perf_counter() - start
    w._check(all(len(g) == n for g in got), "short ranged reads")
    return {"seconds": round(seconds, 3), "files": len(got)}


def boto_first_byte(proxied, lay: Layout) -> dict:
    """A new client's first request (its connection opened by the GET itself)."""
    client = proxied.admin()
    begin()
    start = time.perf_counter()
    answer = client.get_object(Bucket=proxied.bucket, Key=proxied.prefix + lay.huge, Range="bytes=0-0")
    body = answer["Body"].read()
    seconds = time.perf_counter() - start
    w._check(body == lay.local(lay.huge).read_bytes()[:1], "wrong first byte")
    return {"seconds": round(seconds, 3)}


# ---------------------------------------------------------------- reporting

def cell_text(cell: dict | None) -> str:
    if not cell:
        return "-"
    if "failed" in cell:
        return "failed"
    text = f"{cell['seconds']:.3g}" if cell["seconds"] < 100 else f"{cell['seconds']:.0f}"
    if "returned" in cell:
        text += f" (ret {cell['returned']:.2g})"
    return text


def requests_text(counts: dict | None) -> str:
    """'201 req: 200 PUT, 1 LIST; 201 expect-100; 3 conn'"""
    if not counts:
        return "-"
    short = {"POST-create-multipart": "create-mpu", "POST-complete-multipart": "complete-mpu",
             "PUT-part": "part"}
    kinds = sorted(((short.get(k, k), n) for k, n in counts.get("kinds", {}).items()), key=lambda kv: -kv[1])
    text = f"{counts.get('total_requests', 0)}"
    if kinds:
        text += " (" + ", ".join(f"{n} {k}" for k, n in kinds) + ")"
    if counts.get("expect_100"):
        text += f"; {counts['expect_100']} Expect-100"
    text += f"; {counts.get('connections', 0)} conn"
    down = counts.get("bytes_down", 0)
    if down >= MiB:
        text += f"; {down / MiB:.1f} MiB down"
    return text


def tables(doc: dict) -> str:
    """Markdown: per RTT, seconds per workload and tool (rounds separated by /), then requests."""
    out = []
    by_rtt: dict[float, list[dict]] = {}
    for r in doc["rounds"]:
        by_rtt.setdefault(r["rtt_ms"], []).append(r)
    for rtt, rounds in by_rtt.items():
        cols = [c for c in COLUMNS
                if any(c in r["results"].get(row["id"], {}) for r in rounds for row in doc["workloads"])]
        out.append(f"\n**RTT {rtt:g} ms, {doc['rate_mbit']:g} Mbit/s each way** (seconds; writes: until all "
                   "in "
                   f"S3, in brackets when the command returned; {len(rounds)} round(s), separated by /)\n")
        out.append("| workload | " + " | ".join(cols) + " |")
        out.append("|---" * (len(cols) + 1) + "|")
        for row in doc["workloads"]:
            cells = []
            for c in cols:
                vals = [r["results"].get(row["id"], {}).get(c) for r in rounds]
                if all(v is None for v in vals):
                    cells.append("-")
                    continue
                main = " / ".join("failed" if v and "failed" in v else ("-" if not v else fmt(v["seconds"]))
                                  for v in vals)
                rets = [fmt(v["returned"]) for v in vals if v and "returned" in v]
                cells.append(main + (f" ({' / '.join(rets)})" if rets else ""))
            out.append(f"| {row['title']} | " + " | ".join(cells) + " |")
        out.append(f"\nRequests per cell at RTT {rtt:g} ms (counted at the proxy, round 1: total (by kind); "
                   "Expect: 100-continue; TCP connections opened; MiB down):\n")
        out.append("| workload | " + " | ".join(cols) + " |")
        out.append("|---" * (len(cols) + 1) + "|")
        for row in doc["workloads"]:
            cells = [requests_text((rounds[0]["results"].get(row["id"], {}).get(c) or {}).get("proxy"))
                     for c in cols]
            out.append(f"| {row['id']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def summary(doc: dict) -> dict:
    """The run in brief, for bench/README.md: seconds (and when the command returned) and request
    totals per RTT, round, workload and tool."""
    out: dict = {"commit": doc["machine"].get("commit"), "started": doc["started"], "command": doc["command"],
                 "rate_mbit": doc["rate_mbit"], "sizes": doc["sizes"], "rounds": []}
    for r in doc["rounds"]:
        cells: dict = {}
        for wid, tools in r["results"].items():
            for tool, cell in tools.items():
                brief = {"failed": cell["failed"][:120]} if "failed" in cell else {"s": cell["seconds"]}
                if "returned" in cell:
                    brief["returned"] = cell["returned"]
                proxy = cell.get("proxy") or {}
                brief["requests"] = proxy.get("total_requests")
                if proxy.get("expect_100"):
                    brief["expect_100"] = proxy["expect_100"]
                cells.setdefault(wid, {})[tool] = brief
        out["rounds"].append({"rtt_ms": r["rtt_ms"], "round": r["round"], "load": [r.get("load_before"),
                              r.get("load_after")], "cells": cells})
    return out


def fmt(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def targets(doc: dict) -> list[str]:
    """Issue 12's bench targets on this run (informational: judged against its figures)."""
    lines = []
    full = doc["sizes"] == dataclasses.asdict(Sizes())
    for r in doc["rounds"]:
        rtt, res, tag = r["rtt_ms"], r["results"], f"RTT {r['rtt_ms']:g} ms round {r['round']}"

        def get(wid: str, col: str, res=res) -> float | None:
            return (res.get(wid, {}).get(col) or {}).get("seconds")

        mm, s3fs = get("cp_r", "minerva-mount"), get("cp_r", "s3fs")
        if mm:
            per = mm / doc["sizes"]["small_files"] / (rtt / 1e3)
            text = f"{tag}: cp -r of small files {mm:.2f} s = {per:.2f} RTT per file (target <= 1.2 + " \
                   "transfer)"
            before = BEFORE.get(int(rtt), {}).get("cp_r")
            if before and full:
                text += f"; {before / mm:.2f}x faster than issue 12's {before:.1f} s (target >= 1.8x)"
            if s3fs:
                text += f"; s3fs {s3fs:.1f} s ({'ahead' if mm < s3fs else 'BEHIND'})"
            lines.append(text)
        wb, rc = res.get("cp_r", {}).get("minerva-mount-wb") or {}, res.get("cp_r", {}).get("rclone") or {}
        if "seconds" in wb and "seconds" in rc:
            ahead = "ok" if wb["seconds"] < rc["seconds"] else "MISS"
            lines.append(f"{tag}: write-back cp -r until all in S3 {wb['seconds']:.2f} s vs rclone "
                         f"{rc['seconds']:.2f} s ({ahead}: target ahead); cp returned in "
                         f"{wb['returned']:.2f} s vs rclone {rc['returned']:.2f} s "
                         f"({'ok' if wb['returned'] <= rc['returned'] * 1.1 else 'MISS'}: target as fast, "
                         "within 10%)")
        h_mm, h_rc = get("head1", "minerva-mount"), get("head1", "rclone")
        if h_mm and h_rc:
            lines.append(f"{tag}: first byte {h_mm:.3f} s vs rclone {h_rc:.3f} s "
                         f"({'ok' if h_mm <= h_rc else 'MISS'}: target no slower than rclone)")
        for wid, before in BEFORE.get(int(rtt), {}).items() if full else ():
            now = get(wid, "minerva-mount")
            if now and wid not in ("cp_r", "head1"):
                verdict = "ok" if now <= before * 1.1 else "slower"
                lines.append(f"{tag}: {wid} {now:.3g} s vs issue 12's {before:.3g} s ({verdict}; "
                             "target: as good as before, within 10%)")
    return lines


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rtt-ms", default="40,100", help="comma list of round trip times, run in this order "
                   "(default 40,100; a value given twice is a second round)")
    p.add_argument("--rate-mbit", type=float, default=400.0, help="cap per direction (default 400)")
    p.add_argument("--rounds", type=int, default=1, help="times the whole --rtt-ms list is run (default 1)")
    p.add_argument("--quick", action="store_true", help="small sizes, for development")
    p.add_argument("--tools", default=",".join(TOOLS), help="comma list of " + ", ".join(TOOLS))
    all_ids = [r["id"] for r in workload_rows(Sizes())]
    p.add_argument("--workloads", default=",".join(all_ids), help="comma list of " + ", ".join(all_ids))
    p.add_argument("--minerva-rev", default="HEAD", help="the commit of minerva-mount measured, run from a "
                   "`git archive` of it (default HEAD); 'worktree' runs the work tree as it is")
    p.add_argument("--minerva-flags", default=os.environ.get("MINERVA_BENCH_FLAGS"))
    p.add_argument("--s3fs-flags", default=os.environ.get("S3FS_BENCH_FLAGS"))
    p.add_argument("--rclone-flags", default=os.environ.get("RCLONE_BENCH_FLAGS"))
    p.add_argument("--work-dir", type=Path, help="default: a new folder under /var/tmp, removed at the end")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs of every mount, the proxy)")
    p.add_argument("--json", type=Path, default=BENCH / "results" / "wan-latest.json")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--report", type=Path, help="print the tables, targets and brief JSON of a past run")
    for f in dataclasses.fields(Sizes):
        p.add_argument("--" + f.name.replace("_", "-"), type=int, default=None,
                       help=f"size (default {f.default}; quick {getattr(QUICK, f.name)})")
    args = p.parse_args(argv)
    args.rtts = [float(x) for x in args.rtt_ms.split(",") if x.strip()]
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    args.workloads = [x.strip() for x in args.workloads.split(",") if x.strip()]
    sizes = QUICK if args.quick else Sizes()
    sizes = dataclasses.replace(sizes, **{f.name: getattr(args, f.name) for f in dataclasses.fields(Sizes)
                                          if getattr(args, f.name) is not None})
    return args, sizes


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args, sizes = parse_args(argv)
    if args.report:
        doc = json.loads(args.report.read_text())
        print(tables(doc) + "\n\n" + "\n".join(targets(doc)))
        print("\n" + json.dumps(summary(doc), separators=(",", ":")))
        return 0
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="minerva-wan-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    shm = Path("/dev/shm")
    data = Path(tempfile.mkdtemp(prefix="minerva-wan-data-", dir=shm)) if shm.is_dir() else work / "data"
    info = machine(args)
    bench = Wan(args, sizes, work, data)
    info["minerva_mount"] = bench.export()
    info["commit"] = info["minerva_mount"]["commit"]
    started = datetime.datetime.now(datetime.UTC)
    interrupted, error = False, None
    changes = info["minerva_mount"].get("worktree_changes_not_measured") or info["minerva_mount"].get(
        "worktree_changes", [])
    print(f"minerva-mount measured: {info['minerva_mount']['rev']} = {info['commit']} "
          f"({len(changes)} files of minerva_mount/ changed in the work tree"
          f"{', not measured' if info['minerva_mount']['rev'] != 'worktree' else ', measured'}); "
          f"load average {info['load_before']}; {info['nproc']} CPUs", flush=True)
    try:
        bench.setup()
        done: dict[float, int] = {}
        for _ in range(args.rounds):
            for rtt in args.rtts:  # `--rtt-ms 40,100,40`: a second round at 40 after the one at 100
                done[rtt] = done.get(rtt, 0) + 1
                bench.rounds.append(bench.one_round(rtt, done[rtt]))
    except KeyboardInterrupt:
        interrupted = True
        bench.say("interrupted: cleaning up")
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    finally:
        w.kill_children()
        bench.cleanup.close()
        wall = time.monotonic() - bench.start
        shutil.rmtree(data, ignore_errors=True)
        mounted = [p for p in work.glob("*/mnt/*") if peers.mounted(p)]
        if not args.keep and not args.work_dir and not mounted:
            shutil.rmtree(work, ignore_errors=True)
    info["load_after"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    doc = {
        "started": started.isoformat(timespec="seconds"), "wall_seconds": round(wall, 1),
        "command": " ".join([Path(sys.executable).name, "bench/wan.py", *(argv or sys.argv[1:])]),
        "quick": args.quick, "interrupted": interrupted, "error": error, "machine": info,
        "rate_mbit": args.rate_mbit, "sizes": dataclasses.asdict(sizes), "page_cache_dropped": bench.dropped,
        "peers": {"rclone": "reads: " + " ".join(peers.RCLONE_READ) + "; writes: "
                  + " ".join(peers.RCLONE_WRITE),
                  "s3fs": " ".join(peers.S3FS_OPTS)},
        "workloads": bench.rows, "rounds": bench.rounds,
    }
    doc["targets"] = targets(doc)
    print(tables(doc), flush=True)
    print("\n" + "\n".join(doc["targets"]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=2) + "\n"
    args.json.write_text(text)
    (args.json.parent / f"wan-{started.strftime('%Y%m%dT%H%M%SZ')}.json").write_text(text)
    print(f"results: {args.json}  (wall time {wall / 60:.1f} min; load average after {info['load_after']})")
    return 130 if interrupted else (1 if error else 0)


if __name__ == "__main__":
    sys.exit(main())
