#!/usr/bin/env python3
"""A WAN in a box: a TCP proxy on loopback that adds latency and caps bandwidth, per direction.

    python bench/wanproxy.py --upstream 127.0.0.1:8333 --rtt-ms 40 --rate-mbit 400
    python bench/wanproxy.py --selftest [--rtt-ms 40 --rate-mbit 50]

It listens on 127.0.0.1 and forwards every connection to the upstream (the local S3 endpoint).
Each direction of the "access link" is one `Link`, shared by all connections, as a real link
is shared by everything a laptop sends:

- **latency by timestamp**: a chunk read at time t is written out at its due time, t plus the
  one-way delay (plus its wait for the bandwidth cap). Nothing sleeps per chunk before reading
  the next one, so a stream keeps a full pipe (rate x delay bytes in flight) and throughput is
  not capped by latency;
- **bandwidth cap**: one token bucket per direction (GCRA: refilled at the rate, 64 KiB deep),
  shared by all connections; the bottleneck queue holds at most `--queue-ms` of traffic (20 ms
  by default), past which the proxy stops reading from the senders (TCP back-pressure), as a
  full router buffer would; per connection at most `--window-mib` bytes are held (a TCP
  window: bounds memory when no cap is set);
- **TCP handshake**: a new connection's first bytes reach the server one round trip later than
  they would on an open connection (the SYN / SYN-ACK a real connect() waits for), so a client
  that opens a connection per request pays it. `--no-handshake` turns this off. No TLS is
  emulated (the real endpoint is HTTPS: one more round trip per new connection with TLS 1.3).
  TCP slow start is not emulated either: a new connection gets the whole rate at once.

It also counts the HTTP/1.x requests on the client->server side by following the framing
(Content-Length and chunked bodies, so bytes of a body are never taken for a request line),
by method and by S3 kind (LIST, GET, PUT, PUT-part, ...), and how many carried
`Expect: 100-continue`, plus connections and bytes per direction. A control port (its number
printed at start) answers `stats` or `reset` with those counts as one JSON line.

On start it prints one JSON line on stdout: {"port": ..., "control_port": ..., settings}.
It stops on SIGTERM or SIGINT. Standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ipaddress
import json
import os
import random
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from urllib.parse import urlsplit

KiB, MiB = 1 << 10, 1 << 20
CHUNK = 128 * KiB  # the most read from a socket at once
BURST = 64 * KiB  # depth of each direction's token bucket


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Link:
    """One direction of the access link, shared by every connection through the proxy.

    `due(n, now)` books n bytes read at `now` on the link and returns when they reach the far
    end: when the token bucket has let them through (GCRA: the link's virtual clock `tat` moves
    by n / rate per chunk; a chunk may go up to `burst` bytes ahead of it) plus the one-way delay.
    `wait(now)` is how long a sender must hold off so the bottleneck queue stays under `queue`
    seconds of traffic. Both are pure arithmetic on the times given: unit-testable without
    sleeping.
    """

    def __init__(self, delay: float, rate: float | None = None, queue: float = 0.02, burst: int = BURST):
        self.delay = delay  # seconds, one way
        self.rate = rate  # bytes per second, None for no cap
        self.queue = queue  # seconds of traffic the bottleneck queue holds
        self.burst = burst
        self.tat = 0.0  # when the link will have sent everything booked so far

    def wait(self, now: float) -> float:
        if not self.rate:
            return 0.0
        return max(0.0, self.tat - self.queue - now)

    def due(self, n: int, now: float) -> float:
        if not self.rate:
            return now + self.delay
        self.tat = max(now, self.tat) + n / self.rate
        sent = max(now, self.tat - self.burst / self.rate)
        return sent + self.delay


def classify(method: str, target: str, headers: dict[str, str]) -> str:
    """The S3 kind of a request from its method, target and headers (path- or host-style)."""
    query = urlsplit(target).query
    params = {p.split("=", 1)[0] for p in query.split("&") if p}
    if method == "GET":
        if params & {"list-type", "prefix", "delimiter", "marker", "continuation-token"}:
            return "LIST"
        if "uploads" in params:
            return "LIST-uploads"
        if "uploadId" in params:
            return "LIST-parts"
        return "GET"
    if method == "PUT":
        if "x-amz-copy-source" in headers:
            return "COPY-part" if "partNumber" in params else "COPY"
        return "PUT-part" if "partNumber" in params else "PUT"
    if method == "POST":
        if "uploads" in params:
            return "POST-create-multipart"
        if "uploadId" in params:
            return "POST-complete-multipart"
        if "delete" in params:
            return "POST-delete"
        return "POST"
    if method == "DELETE" and "uploadId" in params:
        return "DELETE-abort-multipart"
    return method


class HttpRequests:
    """Counts the HTTP/1.x requests in one client->server byte stream, following its framing.

    Fed the stream in pieces of any size. Bodies (Content-Length, or chunked with trailers) are
    skipped by count, never scanned, so a body that holds "GET / HTTP/1.1" is not a request.
    A stream it cannot follow (not HTTP, a header block over 64 KiB) is marked `broken` and
    counted no further.
    """

    MAX_HEAD = 64 * KiB
    METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS", "PATCH"})

    def __init__(self, stats: Stats):
        self.stats = stats
        self.buf = bytearray()
        self.state = "head"  # head | body | size | data | trailer
        self.remaining = 0
        self.broken = False

    def feed(self, data: bytes) -> None:
        pos, n = 0, len(data)
        while pos < n and not self.broken:
            if self.state in ("body", "data"):
                take = min(self.remaining, n - pos)
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    self.state = "head" if self.state == "body" else "size"
                continue
            end = b"\r\n\r\n" if self.state == "head" else b"\r\n"
            # the terminator may straddle what was buffered and the new bytes
            window = bytes(self.buf) + data[pos:pos + self.MAX_HEAD + len(end)]
            idx = window.find(end)
            if idx < 0:
                if len(window) > self.MAX_HEAD:
                    return self._break("header block over 64 KiB")
                pos += len(window) - len(self.buf)
                self.buf = bytearray(window)
                continue
            pos += idx + len(end) - len(self.buf)
            self.buf.clear()
            self._block(window[:idx])

    def _break(self, why: str) -> None:
        self.broken = True
        self.buf.clear()
        self.stats.unparsed += 1

    def _block(self, block: bytes) -> None:
        if self.state == "head":
            block = block.lstrip(b"\r\n")  # stray CRLFs between requests
            if block:
                self._request(block)
        elif self.state == "size":
            try:
                size = int(block.split(b";", 1)[0].strip(), 16)
            except ValueError:
                return self._break("bad chunk size")
            if size == 0:
                self.state = "trailer"
            else:
                self.state, self.remaining = "data", size + 2  # the chunk and its CRLF
        elif self.state == "trailer" and not block:
            self.state = "head"  # an empty line ends the trailers

    def _request(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or parts[0] not in self.METHODS or not parts[2].startswith("HTTP/1."):
            return self._break("not an HTTP/1 request line")
        method, target = parts[0], parts[1]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self.stats.requests[method] += 1
        self.stats.kinds[classify(method, target, headers)] += 1
        if headers.get("expect", "").lower() == "100-continue":
            self.stats.expect_100 += 1
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self.state = "size"
        else:
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                return self._break("bad Content-Length")
            if length > 0:
                self.state, self.remaining = "body", length


class Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.connections = 0
        self.bytes_up = 0  # client -> server
        self.bytes_down = 0
        self.requests: Counter[str] = Counter()
        self.kinds: Counter[str] = Counter()
        self.expect_100 = 0
        self.unparsed = 0  # connections whose requests could not be followed
        self.resets = 0  # connections ended by an error (reset, refused) rather than by EOF both ways
        self.since = time.monotonic()

    def as_dict(self) -> dict:
        return {"connections": self.connections, "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "requests": dict(sorted(self.requests.items())), "kinds": dict(sorted(self.kinds.items())),
                "total_requests": sum(self.requests.values()), "expect_100": self.expect_100,
                "unparsed": self.unparsed, "resets": self.resets,
                "seconds": round(time.monotonic() - self.since, 3)}


class Proxy:
    """The proxy itself, on the running asyncio loop: `await start()`, then `await close()`."""

    def __init__(self, upstream: tuple[str, int], delay_up: float, delay_down: float,
                 rate_up: float | None = None, rate_down: float | None = None, queue: float = 0.02,
                 window: int = 16 * MiB, handshake: bool = True, listen: tuple[str, int] = ("127.0.0.1", 0)):
        for host in (upstream[0], listen[0]):
            if not _loopback(host):
                raise ValueError(f"{host}: the proxy listens on and forwards to loopback only")
        self.upstream, self.listen, self.window, self.handshake = upstream, listen, window, handshake
        self.up = Link(delay_up, rate_up, queue)
        self.down = Link(delay_down, rate_down, queue)
        self.stats = Stats()
        self.port = self.control_port = 0
        self._servers: list[asyncio.base_events.Server] = []
        self._tasks: set[asyncio.Task] = set()

    def settings(self) -> dict:
        mbit = lambda r: r * 8 / 1e6 if r else None  # noqa: E731
        return {"delay_up_ms": self.up.delay * 1e3, "delay_down_ms": self.down.delay * 1e3,
                "rtt_ms": (self.up.delay + self.down.delay) * 1e3, "rate_up_mbit": mbit(self.up.rate),
                "rate_down_mbit": mbit(self.down.rate), "queue_ms": self.up.queue * 1e3,
                "window_mib": self.window / MiB, "handshake": self.handshake,
                "upstream": f"{self.upstream[0]}:{self.upstream[1]}"}

    async def start(self) -> int:
        server = await asyncio.start_server(self._client, *self.listen)
        control = await asyncio.start_server(self._control, self.listen[0], 0)
        self._servers += [server, control]
        self.port = server.sockets[0].getsockname()[1]
        self.control_port = control.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            command = (await reader.readline()).decode().strip()
            answer = self.stats.as_dict()
            if command == "reset":
                self.stats.reset()
            elif command != "stats":
                answer = {"error": f"unknown command {command!r}; say stats or reset"}
            answer["settings"] = self.settings()
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()

    async def _client(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        loop = asyncio.get_running_loop()
        accepted = loop.time()
        self.stats.connections += 1
        writers, clean = [cwriter], False
        try:
            sreader, swriter = await asyncio.open_connection(*self.upstream)
            writers.append(swriter)
            for w in writers:
                w.transport.set_write_buffer_limits(high=MiB)
                sock = w.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # a real connect() returns after SYN / SYN-ACK: the first bytes leave one RTT later
            not_before = accepted + self.up.delay + self.down.delay if self.handshake else 0.0
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._pipe(creader, swriter, self.up, "bytes_up",
                                                 HttpRequests(self.stats), not_before))
                    group.create_task(self._pipe(sreader, cwriter, self.down, "bytes_down", None, 0.0))
                clean = True
            except* OSError:  # a reset by either side: the other one is reset too
                self.stats.resets += 1
        except OSError:  # the upstream refused
            self.stats.resets += 1
        except asyncio.CancelledError:  # the proxy is closing
            pass
        finally:
            for w in writers:
                w.close() if clean else w.transport.abort()
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link,
                    counter: str, requests: HttpRequests | None, not_before: float) -> None:
        """One direction of one connection: read as fast as the link takes it, write at due times."""
        loop = asyncio.get_running_loop()
        queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        held = 0  # bytes read, not yet handed to the receiver's socket
        queued, room = asyncio.Event(), asyncio.Event()

        async def inbound() -> None:
            nonlocal held
            while True:
                data = await reader.read(CHUNK)
                now = loop.time()
                if not data:
                    queue.append((max(now + link.delay, not_before + link.delay), None))
                    queued.set()
                    return
                if requests is not None:
                    requests.feed(data)
                setattr(self.stats, counter, getattr(self.stats, counter) + len(data))
                while (pause := link.wait(now)) > 0:  # the bottleneck queue is full
                    await asyncio.sleep(pause)
                    now = loop.time()
                due = max(link.due(len(data), now), not_before + link.delay)
                queue.append((due, data))
                held += len(data)
                queued.set()
                while held >= self.window:
                    room.clear()
                    await room.wait()

        async def outbound() -> None:
            nonlocal held
            while True:
                while not queue:
                    queued.clear()
                    await queued.wait()
                due, data = queue[0]
                if (pause := due - loop.time()) > 0:
                    await asyncio.sleep(pause)
                queue.popleft()
                if data is None:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                held -= len(data)
                await writer.drain()
                if held < self.window:
                    room.set()

        async with asyncio.TaskGroup() as group:  # one failing (a reset) cancels the other
            group.create_task(inbound())
            group.create_task(outbound())


# ---------------------------------------------------------------- running it

def stats(control_port: int, command: str = "stats", host: str = "127.0.0.1") -> dict:
    """Ask a running proxy for its counts (`reset` also zeroes them)."""
    with socket.create_connection((host, control_port), timeout=10) as sock:
        sock.sendall(command.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
    return json.loads(data)


class ProxyThread:
    """A Proxy on its own event loop in a thread (tests, the selftest): a context manager."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        self.proxy: Proxy | None = None
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> ProxyThread:
        self._thread.start()

        async def make() -> Proxy:
            proxy = Proxy(*self.args, **self.kwargs)
            await proxy.start()
            return proxy

        self.proxy = asyncio.run_coroutine_threadsafe(make(), self.loop).result(10)
        return self

    @property
    def port(self) -> int:
        return self.proxy.port

    def stats(self, command: str = "stats") -> dict:
        return stats(self.proxy.control_port, command)

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.proxy.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class Started:
    """A proxy started as a separate process (what bench/wan.py uses): its ports and pid."""

    def __init__(self, proc: subprocess.Popen, info: dict):
        self.proc, self.info = proc, info
        self.port, self.control_port = info["port"], info["control_port"]
        self.url = f"http://127.0.0.1:{self.port}"

    def stats(self, command: str = "stats") -> dict:
        return stats(self.control_port, command)


def start_process(upstream: str, rtt_ms: float, rate_mbit: float | None, extra: tuple[str, ...] = (),
                  log=None) -> Started:
    """Start `wanproxy.py` in its own session; the caller stops it by pid (SIGTERM)."""
    argv = [sys.executable, os.path.abspath(__file__), "--upstream", upstream, "--rtt-ms", str(rtt_ms)]
    if rate_mbit:
        argv += ["--rate-mbit", str(rate_mbit)]
    proc = subprocess.Popen(argv + list(extra), stdout=subprocess.PIPE, stderr=log or subprocess.DEVNULL,
                            start_new_session=True, text=True)
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        raise RuntimeError(f"wanproxy exited {proc.returncode} before it was ready")
    return Started(proc, json.loads(line))


def _host_port(text: str) -> tuple[str, int]:
    if "://" in text:
        parts = urlsplit(text)
        return parts.hostname, parts.port or 80
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def _directions(args) -> tuple[float, float, float | None, float | None]:
    if args.delay_ms is not None:
        up = down = args.delay_ms / 1e3
    else:
        up = down = args.rtt_ms / 2e3
    rate = lambda mbit: mbit * 1e6 / 8 if mbit else None  # noqa: E731
    up_rate = rate(args.up_mbit if args.up_mbit is not None else args.rate_mbit)
    down_rate = rate(args.down_mbit if args.down_mbit is not None else args.rate_mbit)
    return up, down, up_rate, down_rate


async def _serve(args) -> None:
    up, down, up_rate, down_rate = _directions(args)
    proxy = Proxy(_host_port(args.upstream), up, down, up_rate, down_rate, args.queue_ms / 1e3,
                  int(args.window_mib * MiB), not args.no_handshake, _host_port(args.listen))
    await proxy.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"port": proxy.port, "control_port": proxy.control_port, "pid": os.getpid(),
                      **proxy.settings()}), flush=True)
    await stop.wait()
    await proxy.close()


# ---------------------------------------------------------------- the upstream used by the checks

class TestServer:
    """A tiny TCP service on 127.0.0.1 for the selftest and the unit tests, one thread per client.

    The first byte of a connection says what it does: `P` echoes byte by byte (ping-pong), `E`
    echoes everything then half-closes at EOF, `S` swallows everything and answers the byte
    count (8 bytes) at EOF, `G` + 8-byte length sends that many seeded bytes then closes.
    """

    __test__ = False  # not a pytest class

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> TestServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        self._thread.join(5)
        self.sock.close()

    def _accept(self) -> None:
        while not self._stop:
            conn, _ = self.sock.accept()
            if self._stop:
                conn.close()
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    BLOCK = random.Random(7).randbytes(MiB)

    @classmethod
    def payload(cls, n: int) -> bytes:
        """The first n bytes of what `G` sends (n <= 1 MiB)."""
        return cls.BLOCK[:n]

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                kind = conn.recv(1)
                if kind == b"P":
                    while b := conn.recv(1):
                        conn.sendall(b)
                elif kind == b"E":
                    while data := conn.recv(CHUNK):
                        conn.sendall(data)
                    conn.shutdown(socket.SHUT_WR)
                elif kind == b"S":
                    n = 0
                    while data := conn.recv(CHUNK):
                        n += len(data)
                    conn.sendall(struct.pack("!Q", n))
                elif kind == b"G":
                    (n,) = struct.unpack("!Q", _recv_exact(conn, 8))
                    block = self.BLOCK
                    for off in range(0, n, MiB):
                        conn.sendall(block[:min(MiB, n - off)])
            except OSError:
                pass


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        piece = sock.recv(min(n - len(data), CHUNK))
        if not piece:
            raise ConnectionError(f"EOF after {len(data)} of {n} bytes")
        data += piece
    return bytes(data)


def _recv_all(sock: socket.socket) -> bytes:
    data = bytearray()
    while piece := sock.recv(CHUNK):
        data += piece
    return bytes(data)


# ---------------------------------------------------------------- selftest

def _upload(port: int, size: int, settle: float) -> tuple[float, float, int]:
    """Send `size` bytes on a new connection: (start, time the server's byte count came back, count)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"S")
        time.sleep(settle)  # past the emulated handshake before timing
        block = TestServer.BLOCK
        start = time.perf_counter()
        for off in range(0, size, MiB):
            sock.sendall(block[:min(MiB, size - off)])
        sock.shutdown(socket.SHUT_WR)
        (n,) = struct.unpack("!Q", _recv_exact(sock, 8))
        return start, time.perf_counter(), n


def _download(port: int, size: int, settle: float) -> tuple[float, float, int]:
    """Ask for `size` bytes on a new connection: (start, time the last byte came, bytes)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        time.sleep(settle)
        start = time.perf_counter()
        sock.sendall(b"G" + struct.pack("!Q", size))
        n, buf = 0, bytearray(MiB)
        while got := sock.recv_into(buf):
            n += got
        return start, time.perf_counter(), n


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _at_once(calls: list) -> list:
    """Run the calls in threads at the same time; their results in order."""
    results: list = [None] * len(calls)

    def run(i: int) -> None:
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def selftest(args) -> int:
    """Measure what a proxy started as a process does against what it was set to; 1 if off."""
    up, down, up_rate, down_rate = _directions(args)
    rtt, size, tol = up + down, int(args.mib * MiB), args.tolerance
    settle = 2 * rtt + 0.05
    rows: list[tuple[str, str, str, bool]] = []

    def check(what: str, want: float, got: float, unit: str, low: float, high: float) -> None:
        rows.append((what, f"{want:.1f} {unit}", f"{got:.1f} {unit}", low <= got <= high))

    def rate_check(what: str, rate: float | None, start: float, end: float, n: int) -> None:
        got = n * 8 / 1e6 / max(end - start - rtt, 1e-9)
        what = f"{what}: {n / MiB:.3g} MiB in {end - start:.3f} s, rate net of one RTT"
        if rate:
            want = rate * 8 / 1e6
            check(what, want, got, "Mbit/s", want * (1 - tol), want * (1 + tol))
        else:
            rows.append((what, "no cap", f"{got:.1f} Mbit/s", True))

    rate_flags = []
    for flag, value in (("--rate-mbit", args.rate_mbit), ("--up-mbit", args.up_mbit),
                        ("--down-mbit", args.down_mbit)):
        if value is not None:
            rate_flags += [flag, str(value)]
    with TestServer() as server:
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--upstream", f"127.0.0.1:{server.port}",
             "--delay-ms", str(up * 1e3), "--queue-ms", str(args.queue_ms), *rate_flags],
            stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            info = json.loads(proc.stdout.readline())
            port = info["port"]
            print(f"wanproxy selftest: {up * 1e3:g} ms each way (RTT {rtt * 1e3:g} ms), cap up "
                  f"{info['rate_up_mbit']} / down {info['rate_down_mbit']} Mbit/s, {args.mib:g} MiB "
                  f"streams, tolerance {tol:.0%}; proxy pid {proc.pid} on 127.0.0.1:{port}", flush=True)
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(b"P")
                time.sleep(settle)  # past the emulated handshake
                times = []
                for _ in range(args.pings):
                    start = time.perf_counter()
                    sock.sendall(b"x")
                    _recv_exact(sock, 1)
                    times.append(time.perf_counter() - start)
            check(f"tiny request on an open connection: RTT, median of {args.pings} "
                  f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})",
                  rtt * 1e3, statistics.median(times) * 1e3, "ms", rtt * 1e3, rtt * 1e3 * (1 + tol) + 2)
            firsts = []
            for _ in range(5):
                start = time.perf_counter()
                with socket.create_connection(("127.0.0.1", port)) as sock:
                    sock.sendall(b"Px")
                    _recv_exact(sock, 1)
                firsts.append(time.perf_counter() - start)
            check("tiny request on a new connection (handshake + request), median of 5",
                  2 * rtt * 1e3, statistics.median(firsts) * 1e3, "ms", 2 * rtt * 1e3,
                  2 * rtt * 1e3 * (1 + tol) + 2)
            start, end, n = _upload(port, size, settle)
            rate_check("one stream up", up_rate, start, end, n) if n == size else \
                rows.append(("one stream up", "all bytes", f"{n} of {size}", False))
            start, end, n = _download(port, size, settle)
            rate_check("one stream down", down_rate, start, end, n) if n == size else \
                rows.append(("one stream down", "all bytes", f"{n} of {size}", False))
            for label, fns in (("two streams up at once (one shared cap)", (_upload,) * 2),
                               ("ten streams up at once (one shared cap)", (_upload,) * 10),
                               ("one stream up and one down at once: up", (_upload, _download))):
                each = size // len(fns) if fns[0] is fns[1] else size
                results = _at_once([lambda fn=fn, each=each: fn(port, each, settle) for fn in fns])
                if fns[0] is fns[1]:
                    rate_check(label, up_rate, min(r[0] for r in results), max(r[1] for r in results),
                               sum(r[2] for r in results))
                else:
                    rate_check(label, up_rate, *results[0])
                    rate_check("one stream up and one down at once: down", down_rate, *results[1])
            counts = stats(info["control_port"])
            moved = counts["bytes_up"] + counts["bytes_down"]
            cpu = _cpu_seconds(proc.pid)
            print(f"proxy: {counts['connections']} connections, {moved / MiB:.0f} MiB forwarded, "
                  f"{counts['resets']} resets; its CPU {cpu:.2f} s, {cpu * 2**30 / moved:.2f} s per GiB")
        finally:
            proc.terminate()
            proc.wait(10)
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'set':>14}  {'measured':>16}  verdict")
    for what, want, got, ok in rows:
        print(f"{what:<{width}}  {want:>14}  {got:>16}  {'ok' if ok else 'OFF'}")
    bad = [r for r in rows if not r[3]]
    print("selftest: " + ("every measure within tolerance" if not bad else f"{len(bad)} measure(s) off"))
    return 1 if bad else 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--upstream", help="host:port (or http://host:port) to forward to; loopback only")
    p.add_argument("--listen", default="127.0.0.1:0", help="host:port to listen on (default 127.0.0.1:0)")
    p.add_argument("--rtt-ms", type=float, default=40.0, help="round trip added, split evenly (default 40)")
    p.add_argument("--delay-ms", type=float, help="one-way delay each way (instead of --rtt-ms)")
    p.add_argument("--rate-mbit", type=float, help="cap per direction, shared by all connections")
    p.add_argument("--up-mbit", type=float, help="client->server cap, overrides --rate-mbit")
    p.add_argument("--down-mbit", type=float, help="server->client cap, overrides --rate-mbit")
    p.add_argument("--queue-ms", type=float, default=20.0, help="bottleneck queue, ms of traffic (20)")
    p.add_argument("--window-mib", type=float, default=16.0, help="bytes held per connection and direction")
    p.add_argument("--no-handshake", action="store_true", help="no extra round trip for new connections")
    p.add_argument("--selftest", action="store_true", help="measure RTT and rates through a proxy, then exit")
    p.add_argument("--mib", type=float, default=8.0, help="selftest: MiB per stream (default 8)")
    p.add_argument("--pings", type=int, default=20, help="selftest: tiny requests timed (default 20)")
    p.add_argument("--tolerance", type=float, default=0.10, help="selftest: allowed relative error (0.10)")
    args = p.parse_args(argv)
    if args.selftest and args.rate_mbit is None and args.up_mbit is None and args.down_mbit is None:
        args.rate_mbit = 50.0
    if not args.selftest and not args.upstream:
        p.error("--upstream is required (or --selftest)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.selftest:
        return selftest(args)
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
