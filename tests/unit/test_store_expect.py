"""What S3Store puts on the wire (issue 12), seen by a tiny S3 stand-in on loopback.

- A PUT under 8 MiB carries no `Expect: 100-continue` (botocore would add it to every `bytes`
  body and wait a round trip for `100 Continue` before sending it); from 8 MiB on the header
  stays, and the body still arrives whole after the server's `100 Continue`.
- Every request shares one pool of connections, kept across a credential refresh: a LIST, a
  small GET, a block GET and PUTs go over one connection, before and after new keys.
- `warm_up` builds the client at mount start and sends nothing.

The stand-in checks no signatures (the mount tests do that against SeaweedFS); it records each
request's method, path, headers, body and the client port of its connection.
"""

import datetime as dt
import hashlib
import threading
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from xml.sax.saxutils import escape

import trio

from minerva_mount.credentials import Credentials
from minerva_mount.store import EXPECT_CONTINUE_FROM, S3Store

BUCKET, PREFIX = "bucket", "org/"


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    port: int  # the client's port: one value per connection


@dataclass
class FakeS3:
    objects: dict[str, bytes] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def requests(self, method: str) -> list[Seen]:
        with self.lock:
            return [r for r in self.seen if r.method == method]

    def connections(self) -> set[int]:
        with self.lock:
            return {r.port for r in self.seen}


def _handler(s3: FakeS3):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, and `100 Continue` answered to Expect

        def log_message(self, *args):
            pass

        def _record(self) -> tuple[str, dict]:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            url = urllib.parse.urlsplit(self.path)
            with s3.lock:
                s3.seen.append(Seen(self.command, urllib.parse.unquote(url.path), dict(self.headers),
                                    body, self.client_address[1]))
            return urllib.parse.unquote(url.path).removeprefix(f"/{BUCKET}/"), \
                dict(urllib.parse.parse_qsl(url.query)) | {"_body": body}

        def _answer(self, status: int, body: bytes = b"", headers: dict | None = None):
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_PUT(self):
            key, query = self._record()
            s3.objects[key] = query["_body"]
            self._answer(200, headers={"ETag": f'"{hashlib.md5(query["_body"]).hexdigest()}"'})

        def do_GET(self):
            key, query = self._record()
            if "prefix" in query or self.path.rstrip("/") == f"/{BUCKET}" or "list-type" in query:
                return self._answer(200, _list_xml(s3.objects, query.get("prefix", "")),
                                    {"Content-Type": "application/xml"})
            data = s3.objects[key]
            first, last = self.headers["Range"].removeprefix("bytes=").split("-")
            part = data[int(first):int(last) + 1]
            self._answer(206, part, {"Content-Range": f"bytes {first}-{last}/{len(data)}",
                                     "ETag": f'"{hashlib.md5(data).hexdigest()}"'})
    return Handler


def _list_xml(objects: dict[str, bytes], prefix: str) -> bytes:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    contents = "".join(
        f"<Contents><Key>{escape(urllib.parse.quote(key))}</Key><Size>{len(data)}</Size>"
        f"<LastModified>{stamp}</LastModified><ETag>\"x\"</ETag></Contents>"
        for key, data in sorted(objects.items()) if key.startswith(prefix) and "/" not in key[len(prefix):])
    return (f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/'
            f'doc/2006-03-01/"><Name>{BUCKET}</Name><Prefix>{escape(prefix)}</Prefix>'
            f"<IsTruncated>false</IsTruncated>{contents}</ListBucketResult>").encode()


@contextmanager
def fake_s3():
    s3 = FakeS3()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(s3))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield s3, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def credentials(key_id: str = "AKIDEXAMPLE") -> Credentials:
    return Credentials(key_id=key_id, secret="secret", token="token",
                       expiration=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
                       region="us-east-1", bucket=BUCKET, prefix=PREFIX)


class FixedProvider:
    """The CredentialProvider's interface, with a set the test swaps (a refresh)."""

    def __init__(self):
        self.current = credentials()

    async def get(self) -> Credentials:
        return self.current


def run_store(test) -> FakeS3:
    with fake_s3() as (s3, url):
        provider = FixedProvider()

        async def main():
            await test(S3Store(provider, url, retry_timeout=5), provider)
        trio.run(main)
        return s3


def test_small_puts_carry_no_expect_and_arrive_whole():
    bodies = {"Incoming/empty/": b"", "Incoming/small.bin": bytes(range(256)) * 64,
              "Incoming/just-under.bin": b"u" * (EXPECT_CONTINUE_FROM - 1)}

    async def test(store, provider):
        for path, body in bodies.items():
            assert await store.put(path, body, {"mtime": "1.0"}) == hashlib.md5(body).hexdigest()
    s3 = run_store(test)
    puts = s3.requests("PUT")
    assert [p.path for p in puts] == [f"/{BUCKET}/{PREFIX}{path}" for path in bodies]  # one each
    for put, body in zip(puts, bodies.values(), strict=True):
        assert "Expect" not in put.headers, f"{put.path} ({len(body)} bytes) carried Expect"
        assert put.body == body
        assert put.headers["x-amz-meta-mtime"] == "1.0"


def test_from_8_mib_the_body_waits_for_100_continue_and_arrives_whole():
    body = bytes(range(251)) * (EXPECT_CONTINUE_FROM // 251 + 1)

    async def test(store, provider):
        await store.put("Incoming/big.bin", body, {})
        upload_id = "u1"
        await store.upload_part("Incoming/part.bin", upload_id, 1, body)
    s3 = run_store(test)
    put, part = s3.requests("PUT")
    for request in (put, part):
        assert request.headers.get("Expect") == "100-continue"
        assert request.body == body


def test_one_connection_serves_every_kind_of_request_and_outlives_a_credential_refresh():
    async def test(store, provider):
        for i in range(5):
            await store.put(f"Incoming/f{i}", b"x" * 1000, {})
        listing = await store.list_dir("Incoming/")
        assert sorted(f.path for f in listing.files) == [f"Incoming/f{i}" for i in range(5)]
        assert await store.get_range("Incoming/f1", 10, 20) == b"x" * 10  # presigned, our pool
        assert await store.get_blocks("Incoming/f2", 0, 1000, 512) == [b"x" * 512, b"x" * 488]
        provider.current = credentials("AKIDREFRESHED")  # a refresh: a new client
        await store.put("Incoming/after", b"y", {})
        assert await store.get_range("Incoming/after", 0, 1) == b"y"
    s3 = run_store(test)
    assert len(s3.seen) == 10
    assert len(s3.connections()) == 1, "requests opened more than one connection"
    assert "AKIDREFRESHED" in s3.requests("PUT")[-1].headers["Authorization"]


def test_warm_up_builds_the_client_and_sends_nothing():
    async def test(store, provider):
        await store.warm_up()
        built = store._client_for
        assert built is not None and built[0] is provider.current
        assert sum(store.requests.values()) == 0
        await store.put("Incoming/a", b"a", {})
        assert store._client_for is built  # the first request used it, built nothing more
    s3 = run_store(test)
    assert len(s3.seen) == 1
