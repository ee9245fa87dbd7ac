"""The workloads: test data, and each measurement through a mount or through raw boto3.

A measurement returns a `Sample` (bytes or files moved, seconds taken) or raises; the caller
turns an exception into a "failed" cell. Reads through mounts use the tools people use (dd,
fio, plain open/read), and the bytes read are checked (lengths everywhere, contents where the
workload reads few bytes), so a fast wrong answer never counts.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from boto3.s3.transfer import TransferConfig

MiB = 1 << 20
KiB = 1 << 10
RANGED_THREADS = 16
RANGED_PART = 8 * MiB


@dataclass(frozen=True)
class Sizes:
    big_mib: int = 1024  # the file read sequentially and randomly
    par_count: int = 4  # large files read in parallel
    par_mib: int = 256
    small_count: int = 500  # files whose first `head_kib` are read
    small_kib: int = 1024
    head_kib: int = 64
    random_count: int = 200
    random_kib: int = 64
    write_mib: int = 1024  # the file copied in
    write_files: int = 1000  # the folder copied in with cp -r
    write_file_kib: int = 4
    list_sizes: tuple[int, ...] = (1000, 10000)


QUICK = Sizes(big_mib=64, par_mib=16, small_count=50, small_kib=256, random_count=50, write_mib=64,
              write_files=100, list_sizes=(100, 1000))


@dataclass
class Sample:
    amount: float  # bytes, or files
    seconds: float
    unit: str = "MB/s"  # "MB/s" (10^6 bytes/s), "files/s" or "s"

    @property
    def value(self) -> float:
        if self.unit == "s":
            return self.seconds
        rate = self.amount / self.seconds
        return rate / 1e6 if self.unit == "MB/s" else rate


class Layout:
    """Where the objects are, relative to the org prefix (the mount root), and the local copies."""

    def __init__(self, sizes: Sizes, data: Path):
        self.sizes, self.data = sizes, data
        self.big = "Outgoing/bench/big.bin"
        self.par = [f"Outgoing/bench/par/p{i}.bin" for i in range(sizes.par_count)]
        self.small = [f"Outgoing/bench/small/s{i:04d}.bin" for i in range(sizes.small_count)]
        self.lists = {n: f"Outgoing/bench/list-{n}" for n in sizes.list_sizes}
        self.write_big = data / "write-big.bin"
        self.write_dir = data / "write-small"

    def local(self, rel: str) -> Path:
        return self.data / rel


_POOL = random.Random(0).randbytes(32 * MiB)


def _write_random(path: Path, size: int, seed: int) -> None:
    """Incompressible bytes, fast: each MiB is a slice of a random pool at an offset picked by
    (seed, MiB number), tagged with both, so no two MiB are alike."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for i in range(0, size, MiB):
            n = min(MiB, size - i)
            off = rng.randrange(len(_POOL) - MiB)
            chunk = f"{seed:08d}:{i // MiB:08d}:".encode() + _POOL[off:off + MiB]
            f.write(chunk[:n])


def make_data(layout: Layout) -> None:
    """Local source files: what is put in the bucket, and what is copied in by the write workloads."""
    s = layout.sizes
    _write_random(layout.local(layout.big), s.big_mib * MiB, 1)
    for i, rel in enumerate(layout.par):
        _write_random(layout.local(rel), s.par_mib * MiB, 100 + i)
    for i, rel in enumerate(layout.small):
        _write_random(layout.local(rel), s.small_kib * KiB, 1000 + i)
    _write_random(layout.write_big, s.write_mib * MiB, 3)
    layout.write_dir.mkdir(parents=True, exist_ok=True)
    for i in range(s.write_files):
        _write_random(layout.write_dir / f"f{i:04d}.dat", s.write_file_kib * KiB, 100_000 + i)


def put_objects(server, layout: Layout, threads: int = 32) -> None:
    """Put every object the read and listing workloads use, with the admin keys."""
    client, bucket, prefix = server.admin(threads), server.bucket, server.prefix
    config = TransferConfig(max_concurrency=10)
    for rel in [layout.big, *layout.par]:
        client.upload_file(str(layout.local(rel)), bucket, prefix + rel, Config=config)
    jobs = [(prefix + rel, layout.local(rel).read_bytes()) for rel in layout.small]
    jobs.append((prefix + "Incoming/keep.txt", b"keeps Incoming/ visible to s3fs and rclone\n"))
    for n, folder in layout.lists.items():
        jobs += [(f"{prefix}{folder}/f{i:05d}.txt", b"x" * 100) for i in range(n)]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda job: client.put_object(Bucket=bucket, Key=job[0], Body=job[1]), jobs))


def drop_caches() -> bool:
    """Drop the kernel's page, dentry and inode caches (root only); False when not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- through a mount

def _check(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(message)


#: Commands running now (dd, fio, cp, ...): killed by `kill_children` on Ctrl-C or a deadline.
CHILDREN: set[subprocess.Popen] = set()


def _start(argv: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    CHILDREN.add(proc)
    return proc


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        CHILDREN.discard(proc)


def kill_children() -> None:
    for proc in list(CHILDREN):
        if proc.poll() is None:
            proc.kill()


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    proc = _start(argv)
    out, err = _finish(proc, timeout)
    if proc.returncode:
        raise RuntimeError(f"{argv[0]} exited {proc.returncode}: {err.strip()[-300:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def dd_read(path: Path, size: int, timeout: float) -> Sample:
    start = time.perf_counter()
    proc = _run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], timeout)
    seconds = time.perf_counter() - start
    got = re.search(r"^(\d+) bytes", proc.stderr, re.M)
    _check(got is not None and int(got.group(1)) == size,
           f"dd read {got.group(1) if got else '?'} bytes of {size}")
    return Sample(size, seconds)


def fio_read(path: Path, size: int, timeout: float) -> Sample:
    start = time.perf_counter()
    proc = _run(["fio", "--name=seqread", f"--filename={path}", "--readonly", "--rw=read", "--bs=256k",
                 f"--size={size}", "--ioengine=psync", "--numjobs=1", "--output-format=json"], timeout)
    seconds = time.perf_counter() - start
    io_bytes = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]["read"]["io_bytes"]
    _check(io_bytes == size, f"fio read {io_bytes} bytes of {size}")
    return Sample(size, seconds)


def random_offsets(layout: Layout) -> list[int]:
    s = layout.sizes
    rng = random.Random(4)
    return [rng.randrange(0, s.big_mib * MiB - s.random_kib * KiB) for _ in range(s.random_count)]


def random_reads(root: Path, layout: Layout) -> Sample:
    """One open file, `random_count` preads of 64 KiB at random offsets, each checked."""
    length = layout.sizes.random_kib * KiB
    offsets = random_offsets(layout)
    with open(layout.local(layout.big), "rb") as f:
        expected = [os.pread(f.fileno(), length, off) for off in offsets]
    fd = os.open(root / layout.big, os.O_RDONLY)
    try:
        start = time.perf_counter()
        got = [os.pread(fd, length, off) for off in offsets]
        seconds = time.perf_counter() - start
    finally:
        os.close(fd)
    _check(got == expected, "random reads returned wrong bytes")
    return Sample(length * len(offsets), seconds)


def head_reads(root: Path, layout: Layout) -> Sample:
    """What a thumbnailer does: open each small file, read its first 64 KiB, close."""
    length = layout.sizes.head_kib * KiB
    expected = [layout.local(rel).read_bytes()[:length] for rel in layout.small]
    got = []
    start = time.perf_counter()
    for rel in layout.small:
        with open(root / rel, "rb", buffering=0) as f:
            got.append(f.read(length))
    seconds = time.perf_counter() - start
    _check(got == expected, "first reads of small files returned wrong bytes")
    return Sample(length * len(got), seconds)


def parallel_dd(root: Path, layout: Layout, timeout: float) -> Sample:
    size = layout.sizes.par_mib * MiB
    start = time.perf_counter()
    procs = [_start(["dd", f"if={root / rel}", "of=/dev/null", "bs=1M"]) for rel in layout.par]
    try:
        errs = [_finish(p, timeout)[1] for p in procs]
    finally:
        for p in procs:
            _finish(p, 0)
    seconds = time.perf_counter() - start
    for p, err in zip(procs, errs, strict=True):
        got = re.search(r"^(\d+) bytes", err, re.M)
        _check(p.returncode == 0 and got is not None and int(got.group(1)) == size,
               f"parallel dd: {err.strip()[-200:]}")
    return Sample(size * len(procs), seconds)


def ls_l(folder: Path, count: int, timeout: float) -> Sample:
    start = time.perf_counter()
    proc = _run(["ls", "-l", str(folder)], timeout)
    seconds = time.perf_counter() - start
    lines = proc.stdout.count("\n")
    _check(lines == count + 1, f"ls -l showed {lines - 1} entries of {count}")
    return Sample(count, seconds, "s")


def find(folder: Path, count: int, timeout: float) -> Sample:
    start = time.perf_counter()
    proc = _run(["find", str(folder)], timeout)
    seconds = time.perf_counter() - start
    lines = proc.stdout.count("\n")
    _check(lines == count + 1, f"find showed {lines - 1} entries of {count}")
    return Sample(count, seconds, "s")


def wait_object(client, bucket: str, key: str, size: int, timeout: float) -> None:
    """Until the object is complete in S3 (HEAD answers with the full length)."""
    end = time.monotonic() + timeout
    while True:
        try:
            if client.head_object(Bucket=bucket, Key=key)["ContentLength"] == size:
                return
        except client.exceptions.ClientError:
            pass
        if time.monotonic() > end:
            raise TimeoutError(f"{key} not complete in S3 after {timeout:.0f} s")
        time.sleep(0.05)


def count_complete(client, bucket: str, prefix: str, size: int) -> int:
    n = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        n += sum(1 for o in page.get("Contents", []) if not o["Key"].endswith("/") and o["Size"] == size)
    return n


def wait_objects(client, bucket: str, prefix: str, count: int, size: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while (n := count_complete(client, bucket, prefix, size)) < count:
        if time.monotonic() > end:
            raise TimeoutError(f"{n} of {count} objects complete under {prefix} after {timeout:.0f} s")
        time.sleep(0.1)


def copy_big(root: Path, server, layout: Layout, tool: str, timeout: float) -> Sample:
    size = layout.sizes.write_mib * MiB
    rel = f"Incoming/w-{tool}/big.bin"
    (root / rel).parent.mkdir()
    subprocess.run(["cat", str(layout.write_big)], stdout=subprocess.DEVNULL, check=True)  # source cached
    start = time.perf_counter()
    _run(["cp", str(layout.write_big), str(root / rel)], timeout)
    wait_object(server.admin(), server.bucket, server.prefix + rel, size, timeout)
    return Sample(size, time.perf_counter() - start)


def copy_folder(root: Path, server, layout: Layout, tool: str, timeout: float) -> Sample:
    s = layout.sizes
    rel = f"Incoming/w-{tool}/small"
    start = time.perf_counter()
    _run(["cp", "-r", str(layout.write_dir), str(root / rel)], timeout)
    wait_objects(server.admin(), server.bucket, f"{server.prefix}{rel}/", s.write_files,
                 s.write_file_kib * KiB, timeout)
    return Sample(s.write_files, time.perf_counter() - start, "files/s")


def delete_prefix(server, prefix: str) -> None:
    client = server.admin()
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=server.bucket, Prefix=prefix):
        keys += [{"Key": o["Key"]} for o in page.get("Contents", [])]
    for i in range(0, len(keys), 1000):
        client.delete_objects(Bucket=server.bucket, Delete={"Objects": keys[i:i + 1000], "Quiet": True})


# ---------------------------------------------------------------- raw boto3

def get_stream(client, bucket: str, key: str, chunk: int = MiB) -> int:
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    n = 0
    while data := body.read(chunk):
        n += len(data)
    return n


def get_ranged(client, bucket: str, key: str, size: int, threads: int = RANGED_THREADS,
               part: int = RANGED_PART) -> int:
    def one(offset: int) -> int:
        end = min(offset + part, size) - 1
        return len(client.get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-{end}")["Body"].read())

    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(one, range(0, size, part)))


def boto_seq(server, layout: Layout, ranged: bool) -> Sample:
    client, size, key = server.admin(), layout.sizes.big_mib * MiB, server.prefix + layout.big
    start = time.perf_counter()
    n = get_ranged(client, server.bucket, key, size) if ranged else get_stream(client, server.bucket, key)
    seconds = time.perf_counter() - start
    _check(n == size, f"read {n} bytes of {size}")
    return Sample(size, seconds)


def boto_random(server, layout: Layout) -> Sample:
    client, length = server.admin(), layout.sizes.random_kib * KiB
    offsets = random_offsets(layout)
    start = time.perf_counter()
    n = sum(len(client.get_object(Bucket=server.bucket, Key=server.prefix + layout.big,
                                  Range=f"bytes={off}-{off + length - 1}")["Body"].read()) for off in offsets)
    seconds = time.perf_counter() - start
    _check(n == length * len(offsets), "short ranged reads")
    return Sample(n, seconds)


def boto_heads(server, layout: Layout) -> Sample:
    client, length = server.admin(), layout.sizes.head_kib * KiB
    start = time.perf_counter()
    n = sum(len(client.get_object(Bucket=server.bucket, Key=server.prefix + rel,
                                  Range=f"bytes=0-{length - 1}")["Body"].read()) for rel in layout.small)
    seconds = time.perf_counter() - start
    _check(n == length * len(layout.small), "short ranged reads")
    return Sample(n, seconds)


def boto_parallel(server, layout: Layout, ranged: bool) -> Sample:
    """Every large file at once: one GET stream each, or each with 16/count ranged GET threads."""
    client, size = server.admin(), layout.sizes.par_mib * MiB
    threads = max(1, RANGED_THREADS // len(layout.par))

    def one(rel: str) -> int:
        key = server.prefix + rel
        return get_ranged(client, server.bucket, key, size, threads) if ranged else \
            get_stream(client, server.bucket, key)

    start = time.perf_counter()
    with ThreadPoolExecutor(len(layout.par)) as pool:
        n = sum(pool.map(one, layout.par))
    seconds = time.perf_counter() - start
    _check(n == size * len(layout.par), "short reads")
    return Sample(n, seconds)


def boto_upload_big(server, layout: Layout) -> Sample:
    """upload_file with boto3's default TransferConfig (8 MiB parts, 10 threads)."""
    client, size = server.admin(), layout.sizes.write_mib * MiB
    key = server.prefix + "Incoming/w-boto3/big.bin"
    start = time.perf_counter()
    client.upload_file(str(layout.write_big), server.bucket, key)
    seconds = time.perf_counter() - start
    wait_object(client, server.bucket, key, size, 30)
    return Sample(size, seconds)


def boto_upload_files(server, layout: Layout, threads: int) -> Sample:
    client, s = server.admin(), layout.sizes
    prefix = f"{server.prefix}Incoming/w-boto3-{threads}/small/"
    files = sorted(layout.write_dir.iterdir())
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda p: client.upload_file(str(p), server.bucket, prefix + p.name), files))
    seconds = time.perf_counter() - start
    complete = count_complete(client, server.bucket, prefix, s.write_file_kib * KiB)
    _check(complete == len(files), f"{complete} of {len(files)} objects complete")
    return Sample(len(files), seconds, "files/s")


def boto_list(server, folder: str, count: int) -> Sample:
    client = server.admin()
    start = time.perf_counter()
    n = 0
    for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=server.bucket, Prefix=f"{server.prefix}{folder}/", Delimiter="/"):
        n += len(page.get("Contents", []))
    seconds = time.perf_counter() - start
    _check(n == count, f"listed {n} of {count}")
    return Sample(count, seconds, "s")


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def guarded(fn, timeout: float, mount=None, cut=TimeoutError):
    """fn() in a thread; past `timeout` kill its commands and abort `mount` (a peers.Mount:
    blocked calls on it then return), and raise `cut`. A hung mount never hangs the bench."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        kill_children()
        if mount is not None:
            mount.abort()
        thread.join(30)
        raise cut(f"cut off after {timeout:.0f} s" + ("; mount aborted" if mount else ""))
    if "error" in box:
        raise box["error"]
    return box["value"]
