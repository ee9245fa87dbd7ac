"""bench/wanproxy.py: bytes pass intact both ways, half-close, many connections, request counts.

Functional checks only: how close the measured RTT and rate come to what was set is the job of
`python bench/wanproxy.py --selftest` (bench/README.md has its figures). The one timing fact
asserted here holds by construction, however loaded the machine: nothing is delivered before
its delay has passed.
"""

import contextlib
import importlib.util
import random
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import pytest

# bench/ is not a package, and putting it on sys.path would let its run.py, report.py, ...
# shadow other modules: load the one file by path.
_spec = importlib.util.spec_from_file_location(
    "wanproxy", Path(__file__).resolve().parents[2] / "bench" / "wanproxy.py")
wanproxy = importlib.util.module_from_spec(_spec)
sys.modules["wanproxy"] = wanproxy
_spec.loader.exec_module(wanproxy)
HttpRequests, Link, ProxyThread, Stats, TestServer = (
    wanproxy.HttpRequests, wanproxy.Link, wanproxy.ProxyThread, wanproxy.Stats, wanproxy.TestServer)

DELAY = 0.005  # one way, seconds
RATE = 200e6 / 8  # bytes per second


@pytest.fixture
def upstream():
    with TestServer() as server:
        yield server


@pytest.fixture
def proxy(upstream):
    with ProxyThread(("127.0.0.1", upstream.port), DELAY, DELAY, RATE, RATE) as running:
        yield running


def connect(proxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=30)


def echo(proxy, data: bytes) -> bytes:
    with connect(proxy) as sock:
        sock.sendall(b"E")
        sender = threading.Thread(target=lambda: (sock.sendall(data), sock.shutdown(socket.SHUT_WR)))
        sender.start()
        got = wanproxy._recv_all(sock)
        sender.join()
    return got


# ---------------------------------------------------------------- the link's arithmetic

def test_link_books_each_chunk_at_the_rate_and_adds_the_delay():
    link = Link(delay=0.02, rate=1e6, queue=0.02, burst=0)
    assert link.due(100_000, now=10.0) == pytest.approx(10.12)  # 0.1 s on the wire, 0.02 in flight
    assert link.due(100_000, now=10.0) == pytest.approx(10.22)  # queued behind the first
    assert link.due(100_000, now=11.0) == pytest.approx(11.12)  # the link was idle meanwhile


def test_link_lets_a_burst_through_at_once_then_holds_the_rate():
    link = Link(delay=0.01, rate=1e6, burst=50_000)
    assert link.due(50_000, now=0.0) == pytest.approx(0.01)
    assert link.due(50_000, now=0.0) == pytest.approx(0.06)
    assert link.due(100_000, now=0.0) == pytest.approx(0.16)


def test_link_makes_senders_wait_when_its_queue_is_full():
    link = Link(delay=0.0, rate=1e6, queue=0.02, burst=0)
    link.due(50_000, now=0.0)  # 50 ms of traffic booked
    assert link.wait(0.0) == pytest.approx(0.03)
    assert link.wait(0.04) == 0.0


def test_a_link_without_a_cap_only_delays():
    link = Link(delay=0.05)
    assert link.due(10 << 20, now=1.0) == pytest.approx(1.05)
    assert link.wait(1.0) == 0.0


# ---------------------------------------------------------------- request counting

def requests_in(stream: bytes, piece: int | None = None) -> Stats:
    stats = Stats()
    counter = HttpRequests(stats)
    if piece is None:
        counter.feed(stream)
    else:
        for i in range(0, len(stream), piece):
            counter.feed(stream[i:i + piece])
    return stats


FAKE = b"GET /b/not-a-request HTTP/1.1\r\nHost: x\r\n\r\n"
STREAM = (
    b"PUT /bucket/acme/a.txt HTTP/1.1\r\nHost: s3\r\nExpect: 100-continue\r\nContent-Length: "
    + str(len(FAKE) + 7).encode() + b"\r\n\r\n" + FAKE + b"1234567"
    + b"GET /bucket?list-type=2&prefix=acme%2F&delimiter=%2F HTTP/1.1\r\nHost: s3\r\n\r\n"
    + b"PUT /bucket/acme/big?partNumber=3&uploadId=u1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"1a;chunk-signature=abc\r\n" + FAKE[:26] + b"\r\n" + b"0\r\nx-amz-checksum-crc32: AAAA\r\n\r\n"
    + b"POST /bucket/acme/big?uploads HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
    + b"HEAD /bucket/acme/a.txt HTTP/1.1\r\n\r\n"
    + b"GET /bucket/acme/a.txt HTTP/1.1\r\nRange: bytes=0-0\r\n\r\n"
    + b"DELETE /bucket/acme/a.txt HTTP/1.1\r\n\r\n"
)


@pytest.mark.parametrize("piece", [None, 1, 2, 3, 7, 64])
def test_requests_are_counted_by_their_framing_whatever_the_pieces(piece):
    stats = requests_in(STREAM, piece)
    assert dict(stats.requests) == {"PUT": 2, "GET": 2, "POST": 1, "HEAD": 1, "DELETE": 1}
    assert dict(stats.kinds) == {"PUT": 1, "LIST": 1, "PUT-part": 1, "POST-create-multipart": 1,
                                 "HEAD": 1, "GET": 1, "DELETE": 1}
    assert stats.expect_100 == 1 and stats.unparsed == 0


def test_a_stream_that_is_not_http_is_marked_and_not_counted():
    stats = requests_in(b"\x16\x03\x01 hello TLS\r\n\r\nGET / HTTP/1.1\r\n\r\n")
    assert stats.unparsed == 1 and not stats.requests


# ---------------------------------------------------------------- through a running proxy

def test_bytes_pass_intact_both_ways(proxy):
    data = random.Random(1).randbytes(3 << 20)
    assert echo(proxy, data) == data
    with connect(proxy) as sock:  # download, then the server closes
        sock.sendall(b"G" + struct.pack("!Q", 2 << 20 | 5))
        got = wanproxy._recv_all(sock)
    assert got == (TestServer.BLOCK * 3)[:2 << 20 | 5]
    counts = proxy.stats()
    assert counts["bytes_up"] == 1 + len(data) + 9 and counts["bytes_down"] == len(data) + (2 << 20 | 5)
    assert counts["resets"] == 0


def test_many_connections_at_once_each_get_their_own_bytes(proxy):
    datas = [random.Random(i).randbytes(64 << 10 | i) for i in range(24)]
    results: list[bytes | None] = [None] * len(datas)

    def one(i: int) -> None:
        results[i] = echo(proxy, datas[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(datas))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == datas
    assert proxy.stats()["connections"] == len(datas)


def test_half_close_reaches_the_server_and_its_answer_still_comes_back(proxy):
    with connect(proxy) as sock:
        sock.sendall(b"S" + b"z" * 100_000)
        sock.shutdown(socket.SHUT_WR)  # the server counts until EOF, then answers
        (n,) = struct.unpack("!Q", wanproxy._recv_exact(sock, 8))
        assert n == 100_000
        assert sock.recv(1) == b""  # then the server's own EOF


def test_nothing_arrives_before_its_delay(proxy):
    with connect(proxy) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.monotonic()
        sock.sendall(b"Px")  # a new connection: handshake, then the request, then the answer
        wanproxy._recv_exact(sock, 1)
        assert time.monotonic() - start >= 4 * DELAY
        for _ in range(3):
            start = time.monotonic()
            sock.sendall(b"y")
            assert wanproxy._recv_exact(sock, 1) == b"y"
            assert time.monotonic() - start >= 2 * DELAY


def test_requests_through_the_proxy_are_counted_and_reset(proxy):
    with connect(proxy) as sock:
        sock.sendall(b"E" + STREAM)  # the echo server's command byte, then HTTP: not parseable
        sock.shutdown(socket.SHUT_WR)
        assert wanproxy._recv_all(sock) == STREAM
    with connect(proxy) as sock:
        sock.sendall(STREAM)  # starts with "P": pinged back byte by byte
        sock.shutdown(socket.SHUT_WR)
        assert wanproxy._recv_all(sock) == STREAM[1:]
    counts = proxy.stats("reset")
    assert counts["unparsed"] == 1 and counts["total_requests"] == 7 and counts["expect_100"] == 1
    assert proxy.stats()["total_requests"] == 0


def test_a_refused_upstream_closes_the_client(upstream):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]  # bound, not listening: connections are refused
        with ProxyThread(("127.0.0.1", closed_port), DELAY, DELAY) as running, connect(running) as sock:
            with contextlib.suppress(ConnectionResetError):  # closed or reset: either way, not hung
                assert sock.recv(1) == b""
            assert running.stats()["resets"] == 1


def test_only_loopback_addresses_are_accepted():
    with pytest.raises(ValueError):
        wanproxy.Proxy(("192.0.2.1", 80), DELAY, DELAY)
    with pytest.raises(ValueError):
        wanproxy.Proxy(("127.0.0.1", 80), DELAY, DELAY, listen=("0.0.0.0", 0))


def wait_until(predicate, what: str, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_reset_by_the_client_ends_the_connection_on_both_sides(proxy):
    sock = connect(proxy)
    sock.sendall(b"P" + b"x" * 10)
    wanproxy._recv_exact(sock, 10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST, not FIN
    wait_until(lambda: not proxy.proxy._tasks, "the proxy to drop the connection")
    assert echo(proxy, b"still serving") == b"still serving"
