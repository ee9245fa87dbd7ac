"""What a real mount puts on the wire for small files and a cold first read (issue 12).

Far from the region every round trip is paid in full, so these count what S3 is sent, seen by
a recording TCP proxy between the mount and the local S3 endpoint (SeaweedFS, which checks the
signatures: a header dropped after signing must leave them valid):
- a small file copied in costs one PUT, without `Expect: 100-continue` (whose wait for
  `100 Continue` is one more round trip), and no HEAD or LIST of its own; the folder `cp -r`
  makes costs its marker's PUT and no LIST (it is known empty);
- the files of a copy go over the connection already open, not one each;
- a cold first read takes the connection its lookups' LISTs opened (one pool serves every
  kind of request), rather than paying a handshake (TCP, and TLS on the real service); its
  walk, two LISTs at a time, takes connections the mount opened at start.
"""

import json
import os
import socket
import subprocess
import threading
from collections import Counter
from contextlib import suppress
from urllib.parse import urlsplit

import pytest

FILES, SIZE = 30, 16 << 10


class Framer:
    """Splits a client's byte stream into HTTP/1.1 requests (by Content-Length) as it comes."""

    def __init__(self):
        self.buffer = b""
        self.body_left = 0
        self.lost = False  # a body framed otherwise (chunked): nothing after it can be read

    def feed(self, data: bytes):
        self.buffer += data
        while not self.lost:
            if self.body_left:
                skip = min(self.body_left, len(self.buffer))
                self.buffer, self.body_left = self.buffer[skip:], self.body_left - skip
                if self.body_left:
                    return
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buffer = self.buffer[:end].decode("latin-1"), self.buffer[end + 4:]
            line, *fields = head.split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
            self.lost = "chunked" in headers.get("transfer-encoding", "")
            self.body_left = int(headers.get("content-length") or 0)
            yield line, headers


class RecordingProxy:
    """Forwards every connection to `upstream`, recording each request's line and headers."""

    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.lock = threading.Lock()
        self.seen: list[tuple[int, str, dict[str, str]]] = []  # (connection, line, headers)
        self.connections = 0
        self.unframed = 0
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def requests(self, method: str = "") -> list[tuple[int, str, dict[str, str]]]:
        with self.lock:
            return [r for r in self.seen if r[1].startswith(method)]

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            with self.lock:
                self.connections += 1
                number = self.connections
                self.sockets += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, number), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, 0), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, number: int) -> None:
        framer = Framer() if number else None
        try:
            while data := source.recv(1 << 16):
                if framer is not None:
                    for line, headers in framer.feed(data):
                        with self.lock:
                            self.seen.append((number, line, headers))
                    if framer.lost:
                        with self.lock:
                            self.unframed += 1
                        framer = None
                sink.sendall(data)
        except OSError:
            pass
        with suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                with suppress(OSError):
                    sock.close()


@pytest.fixture
def proxy(local_minerva):
    local_minerva.wipe()
    recording = RecordingProxy(local_minerva.info["s3_endpoint"])
    yield recording
    recording.close()


def requests(mount) -> Counter:
    return Counter(json.loads(os.getxattr(mount.path, "user.minerva.requests")))


def test_a_small_file_copied_in_costs_one_put_without_expect(proxy, mount_factory, local_minerva, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    files = {f"f{i:02d}.bin": os.urandom(SIZE) for i in range(FILES)}
    for name, data in files.items():
        (source / name).write_bytes(data)
    mount = mount_factory(extra=("--s3-endpoint-url", proxy.url))
    os.listdir(mount.path / "Incoming")  # the listings a copy starts from, outside what is counted
    before, connections_before = requests(mount), proxy.connections
    subprocess.run(["cp", "-r", str(source), str(mount.path / "Incoming" / "copy")], check=True)
    sent = +(requests(mount) - before)

    assert sent["put"] == FILES + 1, sent  # the folder marker, then one PUT per file
    assert sent["list"] == 0, sent  # the folder it made is known empty: not listed, per file or once
    assert set(sent) <= {"put", "list"}, sent  # no HEAD, no multipart
    puts = proxy.requests("PUT ")
    assert len(puts) == FILES + 1
    assert not [line for _, line, headers in puts if "expect" in headers], "a PUT carried Expect"
    assert proxy.unframed == 0
    assert proxy.connections - connections_before <= 1, "the copy opened a connection per file"
    for name, data in files.items():
        assert local_minerva.get(f"Incoming/copy/{name}") == data, name


def test_a_cold_first_read_takes_the_connection_its_lookups_opened(proxy, mount_factory, local_minerva):
    local_minerva.put("Incoming/a/b/c/file", b"first byte, then the rest")
    mount = mount_factory(extra=("--s3-endpoint-url", proxy.url))
    connections_before = proxy.connections
    out = subprocess.run(["head", "-c", "1", str(mount.path / "Incoming/a/b/c/file")],
                         capture_output=True, check=True).stdout
    assert out == b"f"
    # the walk lists two folders at a time (one ahead): both on connections opened at start
    assert proxy.connections == connections_before, "the walk opened a connection"
    sent = requests(mount)
    assert sent["get"] == 1 and set(sent) == {"list", "get"}, sent
    (get_connection, _, _), = proxy.requests("GET /" + local_minerva.bucket + "/" + local_minerva.prefix)
    listed_on = {number for number, line, _ in proxy.requests("GET ") if "list-type=2" in line}
    assert get_connection in listed_on, "the first read opened a connection of its own"
