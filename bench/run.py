#!/usr/bin/env python3
"""Benchmark: minerva-mount beside raw boto3, s3fs-fuse and rclone mount, on one local Minerva.

One command runs everything: it starts its own local Minerva (SeaweedFS on loopback), puts the
objects, then mounts each tool in turn, measures, and unmounts it. Every cell of the table is a
fresh mount (fresh caches) unless the workload is about a warm cache. Results are printed and
written as JSON to bench/results/latest.json. This is a benchmark, not a test: pytest never
collects it. See bench/README.md.

    sudo .venv/bin/python bench/run.py            # the issues' sizes (~15-20 min on 2 cores)
    sudo .venv/bin/python bench/run.py --quick    # small sizes, a few minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402
import report  # noqa: E402
import workloads as w  # noqa: E402

BENCH = Path(__file__).resolve().parent
COLUMNS = ("boto3", "boto3-parallel", "minerva-mount", "s3fs", "rclone")
MOUNT_TOOLS = ("minerva-mount", "s3fs", "rclone")


def workload_table(sizes: w.Sizes) -> list[dict]:
    """Rows of the result table: id, phase, title, unit and which way is better."""
    big = f"{sizes.big_mib} MiB" if sizes.big_mib < 1024 else f"{sizes.big_mib // 1024} GiB"
    wbig = f"{sizes.write_mib} MiB" if sizes.write_mib < 1024 else f"{sizes.write_mib // 1024} GiB"
    rows = [
        ("seq_dd", "reads", f"cold sequential read {big}, dd bs=1M", "MB/s"),
        ("seq_fio", "reads", f"cold sequential read {big}, fio bs=256k", "MB/s"),
        ("warm", "reads", f"warm re-read {big}, dd bs=1M", "MB/s"),
        ("random", "reads", f"{sizes.random_count} random {sizes.random_kib} KiB reads, cold", "MB/s"),
        ("heads", "reads", f"first {sizes.head_kib} KiB of {sizes.small_count} files of "
                           f"{sizes.small_kib} KiB, cold", "MB/s"),
        ("parallel", "reads", f"{sizes.par_count} files of {sizes.par_mib} MiB read in parallel, cold",
         "MB/s"),
        ("write_big", "writes", f"copy {wbig} in, until complete in S3", "MB/s"),
        ("write_small", "writes", f"cp -r {sizes.write_files} files of {sizes.write_file_kib} KiB, "
                                  "until all in S3", "files/s"),
    ]
    for n in sizes.list_sizes:
        rows += [(f"ls_cold_{n}", "listings", f"ls -l of {n} objects, cold", "s"),
                 (f"ls_warm_{n}", "listings", f"ls -l of {n} objects, warm", "s"),
                 (f"find_cold_{n}", "listings", f"find on {n} objects, cold", "s"),
                 (f"find_warm_{n}", "listings", f"find on {n} objects, warm", "s")]
    return [{"id": i, "phase": p, "title": t, "unit": u, "better": "lower" if u == "s" else "higher"}
            for i, p, t, u in rows]


class Bench:
    def __init__(self, args, sizes: w.Sizes, work: Path, data: Path):
        self.args, self.sizes, self.work = args, sizes, work
        self.layout = w.Layout(sizes, data)
        self.cleanup = peers.Cleanup()
        self.rows = workload_table(sizes)
        self.results: dict[str, dict[str, dict]] = {r["id"]: {} for r in self.rows}
        self.start = time.monotonic()
        self.dropped = True
        self.server: peers.Server | None = None
        self.peers: dict[str, peers.Peer] = {}

    # ------------------------------------------------------------ bookkeeping
    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.start:6.0f} s] {text}", flush=True)

    def record(self, wid: str, column: str, sample: w.Sample | None = None,
               failed: str | None = None) -> None:
        if sample is not None:
            cell = {"value": round(sample.value, 3), "seconds": round(sample.seconds, 3),
                    "amount": sample.amount}
            self.say(f"{wid:<16} {column:<15} {sample.value:10.2f} {sample.unit}")
        else:
            cell = {"failed": failed}
            self.say(f"{wid:<16} {column:<15} failed: {failed}")
        self.results[wid][column] = cell

    def timeout(self, nbytes: int) -> float:
        return max(self.args.min_timeout, nbytes / (self.args.min_rate * 1e6))

    def drop(self) -> None:
        if not w.drop_caches():
            self.dropped = False

    # ------------------------------------------------------------ running cells
    def guarded(self, fn, timeout: float, mount: peers.Mount | None):
        return w.guarded(fn, timeout + 15, mount, TimeoutError)

    def cell(self, wid: str, column: str, fn, timeout: float, mount: peers.Mount | None = None) -> bool:
        """Measure one cell; False when the mount had to be aborted."""
        try:
            self.record(wid, column, self.guarded(fn, timeout, mount))
        except KeyboardInterrupt:
            w.kill_children()
            raise
        except Exception as e:
            reason = f"{type(e).__name__}: {e}".strip()
            if mount is not None and mount.proc.poll() is not None:
                reason += f" ({mount.name} exited {mount.proc.returncode}: {mount.log_tail(2)})"
            self.record(wid, column, failed=reason[:400])
            if self.args.verbose:
                traceback.print_exc()
            return mount is None or (mount.proc.poll() is None and os.path.ismount(mount.path))
        return True

    def session(self, peer: peers.Peer, steps: list[tuple], mode: str = "read") -> None:
        """One fresh mount of `peer` running steps (wid, fn(root) -> Sample, timeout, drop_first)."""
        try:
            mount = peer.mount(mode)
        except KeyboardInterrupt:
            raise
        except Exception as e:
            for wid, *_ in steps:
                self.record(wid, peer.name, failed=f"mount: {e}"[:400])
            return
        try:
            for i, (wid, fn, timeout, drop_first) in enumerate(steps):
                if drop_first:
                    self.drop()
                if not self.cell(wid, peer.name, lambda fn=fn: fn(mount.path), timeout, mount):
                    for later, *_ in steps[i + 1:]:
                        self.record(later, peer.name, failed=f"not run: the mount was lost during {wid}")
                    break
        finally:
            peer.release(mount, abort=mount.proc.poll() is not None)

    # ------------------------------------------------------------ phases
    def setup(self) -> None:
        self.say(f"work dir {self.work}, data in {self.layout.data}")
        self.say("starting the local Minerva")
        self.server = peers.start_server(self.work, self.cleanup)
        self.say(f"local Minerva up: s3 {self.server.endpoint}; making the data")
        w.make_data(self.layout)
        self.say("putting the objects")
        w.put_objects(self.server, self.layout)
        self.say("objects in place")
        a = self.args
        makers = {"minerva-mount": (peers.MinervaPeer, a.minerva_flags),
                  "s3fs": (peers.S3fsPeer, a.s3fs_flags), "rclone": (peers.RclonePeer, a.rclone_flags)}
        for name in a.tools:
            if name in makers:
                cls, flags = makers[name]
                self.peers[name] = cls(self.server, self.work, self.cleanup, peers.split_flags(flags))

    def reads(self) -> None:
        s, lay, srv = self.sizes, self.layout, self.server
        big, par = s.big_mib * w.MiB, s.par_count * s.par_mib * w.MiB
        if "boto3" in self.args.tools:
            for wid in ("seq_dd", "seq_fio"):
                self.drop()
                self.cell(wid, "boto3", lambda: w.boto_seq(srv, lay, ranged=False), self.timeout(big))
                self.drop()
                self.cell(wid, "boto3-parallel", lambda: w.boto_seq(srv, lay, ranged=True), self.timeout(big))
            self.drop()
            self.cell("random", "boto3", lambda: w.boto_random(srv, lay), self.args.min_timeout)
            self.drop()
            self.cell("heads", "boto3", lambda: w.boto_heads(srv, lay), self.args.min_timeout)
            self.drop()
            self.cell("parallel", "boto3", lambda: w.boto_parallel(srv, lay, ranged=False), self.timeout(par))
            self.drop()
            self.cell("parallel", "boto3-parallel", lambda: w.boto_parallel(srv, lay, ranged=True),
                      self.timeout(par))
        for peer in self.peers.values():
            self.session(peer, [("seq_dd", lambda r: w.dd_read(r / lay.big, big, self.timeout(big)),
                                 self.timeout(big), True),
                                ("warm", lambda r: w.dd_read(r / lay.big, big, self.timeout(big)),
                                 self.timeout(big), False)])
            self.session(peer, [("seq_fio", lambda r: w.fio_read(r / lay.big, big, self.timeout(big)),
                                 self.timeout(big), True)])
            self.session(peer, [("random", lambda r: w.random_reads(r, lay), self.args.min_timeout, True)])
            self.session(peer, [("heads", lambda r: w.head_reads(r, lay), self.args.min_timeout, True)])
            self.session(peer, [("parallel", lambda r: w.parallel_dd(r, lay, self.timeout(par)),
                                 self.timeout(par), True)])

    def writes(self) -> None:
        s, lay, srv = self.sizes, self.layout, self.server
        size = s.write_mib * w.MiB
        t_big, t_small = self.timeout(size), max(self.args.min_timeout, s.write_files * 0.5)
        if "boto3" in self.args.tools:
            self.cell("write_big", "boto3-parallel", lambda: w.boto_upload_big(srv, lay), t_big)
            self.cell("write_small", "boto3", lambda: w.boto_upload_files(srv, lay, 1), t_small)
            self.cell("write_small", "boto3-parallel", lambda: w.boto_upload_files(srv, lay, 16), t_small)
            w.delete_prefix(srv, srv.prefix + "Incoming/w-")
        for name, peer in self.peers.items():
            self.session(peer, [("write_big", lambda r, n=name: w.copy_big(r, srv, lay, n, t_big),
                                 t_big, False),
                                ("write_small", lambda r, n=name: w.copy_folder(r, srv, lay, n, t_small),
                                 t_small, False)], mode="write")
            w.delete_prefix(srv, srv.prefix + "Incoming/w-")

    def listings(self) -> None:
        srv, t = self.server, self.args.min_timeout * 2
        if "boto3" in self.args.tools:
            for n, folder in self.layout.lists.items():
                for wid in (f"ls_cold_{n}", f"find_cold_{n}"):
                    self.cell(wid, "boto3", lambda f=folder, n=n: w.boto_list(srv, f, n), t)
        for peer in self.peers.values():
            for kind, fn in (("ls", w.ls_l), ("find", w.find)):
                steps = []
                for n, folder in self.layout.lists.items():
                    def run(r, f=folder, n=n, fn=fn):
                        return fn(r / f, n, t)

                    steps += [(f"{kind}_cold_{n}", run, t, True), (f"{kind}_warm_{n}", run, t, False)]
                self.session(peer, steps)


def machine(args) -> dict:
    def first_line(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "not found"

    mem = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), "0")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    weed = Path(sys.executable).parent / "weed"
    git = subprocess.run(["git", "-C", str(peers.REPO), "describe", "--always", "--dirty"],
                         capture_output=True, text=True).stdout.strip()
    branch = subprocess.run(["git", "-C", str(peers.REPO), "rev-parse", "--abbrev-ref", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    return {
        "nproc": os.cpu_count(), "cpu": cpu, "memory_gib": round(int(mem) / 2**20, 1),
        "kernel": platform.release(), "os": first_line(["sh", "-c", ". /etc/os-release; echo $PRETTY_NAME"]),
        "python": platform.python_version(),
        "weed": first_line([str(weed) if weed.exists() else "weed", "version"]),
        "s3fs": first_line(["s3fs", "--version"]), "rclone": first_line(["rclone", "version"]),
        "fio": first_line(["fio", "--version"]), "checkout": f"{branch} {git}",
        "load_before": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, for development")
    p.add_argument("--phases", default="reads,writes,listings", help="comma list (default all)")
    p.add_argument("--tools", default=",".join(("boto3", *MOUNT_TOOLS)),
                   help="comma list of boto3, minerva-mount, s3fs, rclone (default all)")
    p.add_argument("--minerva-flags", default=os.environ.get("MINERVA_BENCH_FLAGS"),
                   help="extra minerva-mount flags, e.g. '--cache-size 20G' (env MINERVA_BENCH_FLAGS)")
    p.add_argument("--s3fs-flags", default=os.environ.get("S3FS_BENCH_FLAGS"),
                   help="extra s3fs arguments, e.g. '-o use_cache=/tmp/c' (env S3FS_BENCH_FLAGS)")
    p.add_argument("--rclone-flags", default=os.environ.get("RCLONE_BENCH_FLAGS"),
                   help="extra rclone mount flags (env RCLONE_BENCH_FLAGS)")
    p.add_argument("--work-dir", type=Path, help="default: a new folder under /var/tmp, removed at the end")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, server state)")
    p.add_argument("--json", type=Path, default=BENCH / "results" / "latest.json")
    p.add_argument("--min-rate", type=float, default=4.0,
                   help="MB/s below which a large transfer is cut off as failed (default 4)")
    p.add_argument("--min-timeout", type=float, default=60.0, help="seconds any cell may take at least")
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks of failed cells")
    for f in dataclasses.fields(w.Sizes):
        p.add_argument("--" + f.name.replace("_", "-"), type=str, default=None,
                       help=f"size override (default {f.default}; quick {getattr(w.QUICK, f.name)})")
    args = p.parse_args(argv)
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    args.phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    sizes = w.QUICK if args.quick else w.Sizes()
    overrides = {}
    for f in dataclasses.fields(w.Sizes):
        text = getattr(args, f.name)
        if text is not None:
            many = f.name == "list_sizes"
            overrides[f.name] = tuple(int(x) for x in text.split(",")) if many else int(text)
    return args, dataclasses.replace(sizes, **overrides)


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args, sizes = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="minerva-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    shm = Path("/dev/shm")
    data = Path(tempfile.mkdtemp(prefix="minerva-bench-data-", dir=shm)) if shm.is_dir() else work / "data"
    info = machine(args)
    bench = Bench(args, sizes, work, data)
    started = datetime.datetime.now(datetime.UTC)
    interrupted, error = False, None
    print(report.machine_text(info), flush=True)
    try:
        bench.setup()
        for name, peer in bench.peers.items():
            bench.say(f"{name}: {peer.describe()}")
            for note in peer.notes:
                bench.say(f"{name}: {note}")
        for phase in ("reads", "writes", "listings"):
            if phase in args.phases:
                bench.say(f"--- {phase}")
                getattr(bench, phase)()
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
        mounted = [p for p in (work / "mnt").glob("*") if os.path.ismount(p)]
        if not args.keep and not args.work_dir and not mounted:
            shutil.rmtree(work, ignore_errors=True)
    doc = {
        "started": started.isoformat(timespec="seconds"), "wall_seconds": round(wall, 1),
        "command": " ".join([Path(sys.executable).name, "bench/run.py", *(argv or sys.argv[1:])]),
        "quick": args.quick, "interrupted": interrupted, "error": error, "machine": info,
        "sizes": dataclasses.asdict(sizes), "page_cache_dropped": bench.dropped,
        "peers": {n: {"command": p.describe(), "notes": p.notes} for n, p in bench.peers.items()},
        "columns": list(COLUMNS), "workloads": bench.rows, "results": bench.results,
    }
    info["load_after"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    doc["targets"] = report.targets(doc)
    print(report.table_text(doc), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=2) + "\n"
    args.json.write_text(text)
    (args.json.parent / f"run-{started.strftime('%Y%m%dT%H%M%SZ')}.json").write_text(text)
    print(f"results: {args.json}  (wall time {wall / 60:.1f} min)")
    return 130 if interrupted else (1 if error else 0)


if __name__ == "__main__":
    sys.exit(main())
