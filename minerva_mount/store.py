"""The object store: the only module that calls boto3.

Paths here are relative to the org prefix ("Incoming/a.csv"); the prefix is added in one
place, `_key`, so no request can leave the org's area. Every boto3 call runs in a worker
thread under one CapacityLimiter, signed with credentials fresh from the provider, and every
failure comes back as a typed error carrying its errno.

Retries are ours, not botocore's: a request that fails for a reason that may pass (connection
refused or reset, timeout, 5xx, throttling) is sent again with exponential backoff and full
jitter until `retry_timeout` seconds have passed since its first attempt, so an S3 outage
shorter than that bound costs time, never an error. Every request is idempotent (parts carry
their number, PUTs their whole body, GETs their range), so sending one twice is harmless.

Far from the region every round trip counts (issue 12): a small PUT goes out without
`Expect: 100-continue` (see `_expect_only_for_large_bodies`), every request shares one pool of
connections that outlives the client rebuilt at each credential refresh, and the client is
built when the mount starts (`warm_up`), in a worker thread, not in the first request's time.
At 40 ms RTT (S3 and the Minerva API behind bench/wanproxy.py), a fresh mount's
`head -c 1 Incoming/a/b/c/file` went from 0.42-0.47 s (the client built, then two connections
opened: one for the LISTs, one for the GET) to 0.31-0.37 s (one connection), the mount ready
as soon as before (0.30-0.39 s either way, 5 rounds each).
"""

import logging
import random
import socket
from collections import Counter
from collections.abc import Callable
from typing import Any

import boto3
import botocore.awsrequest
import botocore.config
import botocore.exceptions
import botocore.httpsession
import botocore.session
import botocore.utils
import trio
import urllib3.exceptions

from .credentials import CredentialProvider, Credentials
from .errors import MinervaError, NotFound, StoreError
from .s3answers import (  # noqa: F401 (ObjectInfo, Listing, ObjectChanged, MTIME_META: used from here)
    ACCESS_DENIED_MARKER,
    MTIME_META,
    Listing,
    ObjectChanged,
    ObjectInfo,
    client_error,
    map_client_error,
    next_token,
    object_info,
    parse_list_page,
    parse_timestamp,
    retryable,
)

log = logging.getLogger("minerva.store")

FIRST_BACKOFF, MAX_BACKOFF = 0.2, 5.0
# Bodies from this size on keep the `Expect: 100-continue` botocore gives them; smaller ones go
# without it (see _expect_only_for_large_bodies). 8 MiB: multipart.MIN_PART, so every single
# PUT (always smaller) goes in one round trip, and staged files' parts keep botocore's choice.
EXPECT_CONTINUE_FROM = 8 << 20


def _expect_only_for_large_bodies(request, **_kwargs) -> None:
    """`before-send` handler: no `Expect: 100-continue` on a body under EXPECT_CONTINUE_FROM.

    botocore puts the header on every PutObject and UploadPart whose body is file-like, which
    includes every `bytes` body (it wraps them in BytesIO; a `bytearray` part gets none), and
    then waits for the server's `100 Continue` before it sends the body: one more round trip
    per request. Measured at 40 ms RTT and 400 Mbit/s (bench/wanproxy.py): 100 PUTs of
    16 KiB in a row took 88 ms each with it, 46 ms without; a `cp -r` of 200 x 16 KiB files
    through the mount, until all were in S3, 18.4 s with it and 9.8-10.0 s without.

    What the header buys is not sending the body of a request the server refuses. Errors
    stay readable without it: with botocore 1.44 and urllib3 2.8, against a server that answers
    403 right after the headers and closes with the body unread (RST), the AccessDenied came
    back whole for bodies of 16 KiB to 64 MiB with or without it (SeaweedFS reads the body
    before it refuses anyway). Our requests stay inside the policy (`_key`), so a refusal is
    rare (revoked keys, throttling), and what it would waste is one body's upload: under
    0.2 s at 400 Mbit/s for the largest single PUT (under 8 MiB), against a round trip on every
    request. From 8 MiB on (parts of staged files, 8 in flight) botocore's choice is kept: the
    round trip then overlaps the other parts' transfer (32 parts of 8 MiB at 40 ms and
    400 Mbit/s: 5.76 s with the header, 5.75-5.77 s without), while a refused part at a
    20 Mbit/s uplink would waste 3.4 s. The header is not signed
    (botocore.auth.SIGNED_HEADERS_BLACKLIST), so it can go after signing. Also spared:
    botocore's 1 s wait for a `100 Continue` that some proxies never send, and the trouble
    reported with an empty body's answer (boto/botocore#3755; folder markers are empty).
    """
    headers = request.headers
    if "Expect" not in headers:
        return None
    # Content-Length, or with aws-chunked bodies (HTTPS) the length before chunk framing.
    length = headers.get("Content-Length") or headers.get("X-Amz-Decoded-Content-Length")
    if length is not None and int(length) < EXPECT_CONTINUE_FROM:
        del headers["Expect"]
    return None  # anything else would be taken as the response


class S3Store:
    """`max_threads`: requests at once (threads, and connections in the pool). 24: write-back
    keeps up to 16 small PUTs in flight (writeback.py), and reads must not wait behind them."""

    def __init__(self, provider: CredentialProvider, endpoint_url: str | None = None,
                 max_threads: int = 24, retry_timeout: float = 60.0):
        self._provider = provider
        self._endpoint_url = endpoint_url
        self._limiter = trio.CapacityLimiter(max_threads)
        self.retry_timeout = retry_timeout
        self._config = botocore.config.Config(
            s3={"addressing_style": "path"},
            signature_version="s3v4",  # also for the presigned LIST URLs (see _list_page)
            retries={"mode": "standard", "total_max_attempts": 1},  # retries: see _call
            max_pool_connections=max_threads,
            connect_timeout=5, read_timeout=60,
            # No x-amz-checksum-mode on GETs: ranged GETs carry no checksum to check, and the
            # block cache keeps its own CRC-32; saves ~0.15 ms of CPU per request.
            response_checksum_validation="when_required",
            user_agent_extra="minerva-mount",
        )
        self._client_for: tuple[Credentials, Any] | None = None
        self._client_lock = trio.Lock()  # one build at a time (see _client)
        self._session: boto3.session.Session | None = None  # kept: see _new_client
        self._http = None  # the connection pool of every request (see _new_client)
        self.copy_part_above = 5 << 30  # CopyObject's limit
        self.copy_part_size = 512 << 20
        self.requests: Counter[str] = Counter()

    @property
    def bucket(self) -> str:
        return self._provider.current.bucket

    def _key(self, path: str) -> str:
        return self._provider.current.prefix + path

    async def warm_up(self) -> None:
        """Build the S3 client while the mount starts, not in its first request's time.

        A first client costs 0.08-0.14 s of CPU (measured: botocore loads the S3 model and
        endpoint rules and makes the client class), which the first `ls` or `cat` of a fresh
        mount waited for. The daemon starts this before it fetches the credentials: what
        needs no keys is loaded meanwhile, overlapping that round trip to the Minerva API, and
        the client proper (~4 ms once the model is loaded) follows as soon as they arrive.
        Nothing is sent to S3, so a mount coming up while S3 is out of reach is not delayed,
        and the request counts stay those of what users do.
        """
        try:
            async with self._client_lock:
                await trio.to_thread.run_sync(self._prepare)
            await self._client(await self._provider.get())
        except MinervaError as exc:  # the first request meets it again, and reports it
            log.debug("S3 client not built ahead: %s", exc)
        except ValueError as exc:  # botocore's answer to an unusable endpoint URL
            log.warning("S3 client not built: %s", exc)

    async def _client(self, creds: Credentials):
        """The client for `creds`, built in a worker thread: never on the event loop, where a
        build would stall every file system request meanwhile."""
        if self._client_for is None or self._client_for[0] is not creds:
            async with self._client_lock:  # callers arriving meanwhile wait for the same build
                if self._client_for is None or self._client_for[0] is not creds:
                    client = await trio.to_thread.run_sync(self._new_client, creds)
                    self._client_for = (creds, client)
        return self._client_for[1]

    def _prepare(self) -> None:
        """What every client shares, made once (under `_client_lock`, in a worker thread).

        One boto3 session serves every client: it keeps the S3 model it loaded, so the client
        made at each credential refresh costs ~4 ms of CPU instead of 60-150 ms. One HTTP
        session, `_http`, carries every request (see `_new_client`).
        """
        if self._session is not None:
            return
        botocore_session = botocore.session.get_session()
        botocore_session.get_component("response_parser_factory").set_parser_defaults(
            timestamp_parser=parse_timestamp)
        session = boto3.session.Session(botocore_session=botocore_session)
        # As botocore makes its own: CA bundle, proxies, timeouts, pool size, no Nagle wait.
        self._http = botocore.httpsession.URLLib3Session(
            verify=botocore_session.get_config_variable("ca_bundle") or True,
            proxies=botocore.utils.get_environ_proxies(self._endpoint_url or "https://s3.amazonaws.com"),
            timeout=(5, 60), max_pool_connections=self._limiter.total_tokens,
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        # Placeholder keys: this client never sends a request. Making it has botocore load
        # and keep the S3 model, endpoint rules and client class: most of a first build.
        session.client("s3", endpoint_url=self._endpoint_url, region_name="us-east-1",
                       aws_access_key_id="unused", aws_secret_access_key="unused",
                       config=self._config)
        self._session = session

    def _new_client(self, creds: Credentials):
        """A client signed with `creds` (boto3 clients are thread-safe, but their keys fixed).

        Every request, botocore's and ours (LIST pages, small GETs), goes through `_http`: the
        connections opened by one kind of request serve the next (a cold first read after
        the lookups' LISTs finds one open instead of paying a TCP and TLS handshake, 2-3
        round trips), and they stay open across credential refreshes, which used to start
        each new client with an empty pool. `_endpoint` is botocore's private attribute: if it
        ever goes, requests only lose the sharing.
        """
        self._prepare()
        client = self._session.client(
            "s3", endpoint_url=self._endpoint_url, region_name=creds.region,
            aws_access_key_id=creds.key_id, aws_secret_access_key=creds.secret,
            aws_session_token=creds.token, config=self._config)
        client.meta.events.register("before-send.s3", _expect_only_for_large_bodies,
                                    unique_id="minerva-expect-only-for-large-bodies")
        endpoint = getattr(client, "_endpoint", None)
        if endpoint is not None and hasattr(endpoint, "http_session"):
            endpoint.http_session = self._http
        return client

    async def _call(self, kind: str, path: str, fn: Callable[[Any], Any]):
        """Run `fn(client)` in a worker thread, retrying transient failures up to the bound."""
        deadline = trio.current_time() + self.retry_timeout
        backoff, attempts = FIRST_BACKOFF, 0
        while True:
            creds = await self._provider.get()  # per attempt: an outage may outlast a set
            client = await self._client(creds)
            self.requests[kind] += 1
            attempts += 1
            log.debug("request %s %s", kind, path)
            try:
                result = await trio.to_thread.run_sync(fn, client, limiter=self._limiter)
            except botocore.exceptions.ClientError as exc:
                error = map_client_error(exc, kind, path)
                if not retryable(exc):
                    raise error from None
            except botocore.exceptions.ParamValidationError as exc:
                raise StoreError(f"{kind} {path}: invalid request ({exc})") from None
            except (botocore.exceptions.BotoCoreError, urllib3.exceptions.HTTPError, OSError) as exc:
                error = StoreError(f"{kind} {path}: S3 unreachable or failing ({type(exc).__name__})")
            else:
                if attempts > 1:
                    log.info("%s %s succeeded after %d attempts", kind, path, attempts)
                return result
            delay = random.uniform(0, backoff)  # full jitter: retries of many calls spread out
            if trio.current_time() + delay > deadline:
                log.error("%s; giving up after %d attempts in %.0f s (--s3-retry-timeout)",
                          error, attempts, self.retry_timeout)
                raise error
            if attempts == 1:
                log.warning("%s; retrying for up to %.0f s", error, self.retry_timeout)
            await trio.sleep(delay)
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def list_dir(self, path: str) -> Listing:
        """List one folder level with delimiter '/', following continuation tokens.

        Each page is parsed while the next one is on its way: the token it needs is read from
        the raw answer first, so the server's time and ours overlap.
        """
        files, dirs = [], []
        base = self._key(path)
        params = {"Bucket": self.bucket, "Prefix": base, "Delimiter": "/"}
        body: bytes | None = await self._list_body(path, params)
        while body is not None:
            token, following = next_token(body), []
            # Errors are kept, not raised, inside the nursery: it would wrap them in an
            # ExceptionGroup, and callers expect the MinervaError with its errno.
            async with trio.open_nursery() as nursery:
                if token:
                    nursery.start_soon(self._list_into, following, path,
                                       {**params, "ContinuationToken": token})
                try:
                    page = await trio.to_thread.run_sync(parse_list_page, body, base, path,
                                                         limiter=self._limiter)
                except MinervaError as exc:
                    nursery.cancel_scope.cancel()
                    page = exc
            for outcome in (page, *following):
                if isinstance(outcome, MinervaError):
                    raise outcome
            files.extend(page.files)
            dirs.extend(page.dirs)
            body = following[0] if following else None
        return Listing(files, dirs)

    async def _list_into(self, out: list, path: str, params: dict) -> None:
        try:
            out.append(await self._list_body(path, params))
        except MinervaError as exc:
            out.append(exc)

    async def list_dir_page(self, path: str) -> Listing | None:
        """The folder's listing if one LIST page holds it all (1,000 keys), else None."""
        base = self._key(path)
        body = await self._list_body(path, {"Bucket": self.bucket, "Prefix": base, "Delimiter": "/"})
        if next_token(body):
            return None
        page = await trio.to_thread.run_sync(parse_list_page, body, base, path, limiter=self._limiter)
        return Listing(page.files, page.dirs)

    async def _list_body(self, path: str, params: dict) -> bytes:
        return await self._call("list", path, lambda c: self._get_list_page(c, params))

    def _get_list_page(self, client, params: dict) -> bytes:
        """One ListObjectsV2 page as raw XML, read by `parse_list_page` rather than botocore.

        botocore's response parser costs ~0.3 ms per key, and checks every 200 answer for an
        error document by parsing it once more: three quarters of the time of a cold `ls -l`
        of 10,000 objects. So the request is signed by botocore (a presigned URL, the same
        signature and endpoint as any other call), sent on botocore's HTTP session, and the XML
        read with ElementTree. Errors become the ClientError botocore would raise, so
        `_call` maps and retries them as for every other request; so does a cut-off answer.
        The URL carries the session token: it is never logged, and errors name only the
        exception type (see `_call`).
        """
        url = client.generate_presigned_url(
            "list_objects_v2", Params={**params, "EncodingType": "url"}, ExpiresIn=900)
        response = self._http.send(botocore.awsrequest.AWSRequest("GET", url).prepare())
        body = response.content
        if response.status_code == 200 and body.rstrip().endswith(b"</ListBucketResult>"):
            return body
        raise client_error(response.status_code, body, "ListObjectsV2")

    async def list_tree(self, path: str) -> list[ObjectInfo]:
        """Every object under `path` (ends with '/'), folder markers included, all levels."""
        found, token, base = [], None, self._key(path)
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": base}
            if token:
                kwargs["ContinuationToken"] = token
            page = await self._call("list", path, lambda c, kw=kwargs: c.list_objects_v2(**kw))
            found.extend(object_info(path + obj["Key"][len(base):], obj["Size"], obj["LastModified"],
                               obj.get("ETag", "")) for obj in page.get("Contents", []))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return found

    async def has_children(self, path: str) -> bool:
        """Whether anything but the folder marker itself lies under `path` (ends with '/')."""
        base = self._key(path)
        page = await self._call("list", path, lambda c: c.list_objects_v2(
            Bucket=self.bucket, Prefix=base, MaxKeys=2))
        return any(obj["Key"] != base for obj in page.get("Contents", []))

    async def head(self, path: str) -> ObjectInfo:
        r = await self._call("head", path, lambda c: c.head_object(Bucket=self.bucket, Key=self._key(path)))
        return object_info(path, r["ContentLength"], r["LastModified"], r.get("ETag", ""), r.get("Metadata"))

    async def get_range(self, path: str, start: int, end: int, etag: str | None = None) -> bytes:
        """Bytes [start, end) of the object; ObjectChanged if it no longer has `etag`."""
        kwargs = self._range_params(path, start, end, etag)
        return await self._call("get", path, lambda c: self._get_small(c, kwargs, end - start))

    def _range_params(self, path: str, start: int, end: int, etag: str | None) -> dict:
        """GetObject parameters for bytes [start, end), pinned to `etag` when given."""
        params = {"Bucket": self.bucket, "Key": self._key(path), "Range": f"bytes={start}-{end - 1}"}
        if etag:
            params["IfMatch"] = f'"{etag}"'
        return params

    def _get_small(self, client, params: dict, size: int) -> bytes:
        """A ranged GetObject sent as LIST pages are (see `_get_list_page`): a presigned URL on
        botocore's HTTP session. botocore's request pipeline costs ~2.5 ms of CPU per GET, this
        ~1.4 ms: a third of what opening a file and reading its first 64 KiB costs the daemon.
        The URL carries the session token: it is never logged (see `_get_list_page`)."""
        url = client.generate_presigned_url("get_object", Params=params, ExpiresIn=900)
        headers = {"Range": params["Range"]}  # signed with the URL: sent as they were signed
        if "IfMatch" in params:
            headers["If-Match"] = params["IfMatch"]
        response = self._http.send(botocore.awsrequest.AWSRequest("GET", url, headers=headers).prepare())
        body = response.content
        if response.status_code == 206:
            return body
        if response.status_code == 200:  # the whole object (a server that ignores Range)
            first = int(params["Range"][len("bytes="):].split("-")[0])
            return body[first:first + size]
        raise client_error(response.status_code, body, "GetObject")

    async def get_blocks(self, path: str, start: int, end: int, block_size: int,
                         etag: str | None = None) -> list[bytes]:
        """Bytes [start, end) in one GET, as pieces of `block_size` (the last may be shorter).

        The body is read piece by piece: each piece is its own allocation of one size, which
        malloc hands out again once a piece is freed. One 16 MiB bytes per GET instead comes
        fresh from the kernel each time, page by page (~0.4 s CPU per GiB in page faults).
        """
        kwargs = self._range_params(path, start, end, etag)

        def fetch(client) -> list[bytes]:
            body = client.get_object(**kwargs)["Body"]
            pieces, left = [], end - start
            while left > 0:
                want = min(block_size, left)
                piece = body.read(want)
                while 0 < len(piece) < want:  # a short read: complete the piece
                    more = body.read(want - len(piece))
                    if not more:
                        break
                    piece += more
                if len(piece) < want:
                    break  # the body ended early: the caller finds the bytes short
                pieces.append(piece)
                left -= want
            body.close()
            return pieces
        return await self._call("get", path, fetch)

    async def put(self, path: str, data: bytes, metadata: dict[str, str]) -> str:
        r = await self._call("put", path, lambda c: c.put_object(
            Bucket=self.bucket, Key=self._key(path), Body=data, Metadata=metadata))
        return r.get("ETag", "").strip('"')

    async def create_multipart(self, path: str, metadata: dict[str, str]) -> str:
        r = await self._call("create_multipart", path, lambda c: c.create_multipart_upload(
            Bucket=self.bucket, Key=self._key(path), Metadata=metadata))
        return r["UploadId"]

    async def upload_part(self, path: str, upload_id: str, number: int, data: bytes) -> str:
        r = await self._call("upload_part", path, lambda c: c.upload_part(
            Bucket=self.bucket, Key=self._key(path), UploadId=upload_id, PartNumber=number,
            Body=data))
        return r["ETag"]

    async def complete_multipart(self, path: str, upload_id: str, parts: list[tuple[int, str]]) -> str:
        doc = {"Parts": [{"PartNumber": n, "ETag": etag} for n, etag in parts]}
        try:
            r = await self._call("complete_multipart", path, lambda c: c.complete_multipart_upload(
                Bucket=self.bucket, Key=self._key(path), UploadId=upload_id, MultipartUpload=doc))
        except NotFound:
            # NoSuchUpload after a retry: the first attempt completed it and only its answer
            # was lost. The object then carries a multipart ETag with our part count.
            info = await self.head(path)
            if info.etag.endswith(f"-{len(parts)}"):
                log.info("%s: completed by an earlier attempt whose answer was lost", path)
                return info.etag
            raise
        return r.get("ETag", "").strip('"')

    async def copy(self, src: str, dst: str, size: int | None = None) -> str:
        """Server-side copy keeping the metadata; UploadPartCopy for objects above 5 GiB.

        Returns the new object's ETag. `size` (from a listing) saves a HEAD for small objects.
        """
        if size is None or size > self.copy_part_above:
            info = await self.head(src)
            if info.size > self.copy_part_above:
                return await self._copy_parts(src, dst, info)
        source = {"Bucket": self.bucket, "Key": self._key(src)}
        r = await self._call("copy", src, lambda c: c.copy_object(
            Bucket=self.bucket, Key=self._key(dst), CopySource=source))
        return r.get("CopyObjectResult", {}).get("ETag", "").strip('"')

    async def _copy_parts(self, src: str, dst: str, info: ObjectInfo) -> str:
        """CopyObject stops at 5 GiB: copy ranges as parts of a multipart upload, 4 at a time."""
        part = max(self.copy_part_size, -(-info.size // 10_000))
        upload_id = await self.create_multipart(dst, info.metadata)
        source = {"Bucket": self.bucket, "Key": self._key(src)}
        etags: dict[int, str] = {}
        errors: list[MinervaError] = []
        limiter = trio.CapacityLimiter(4)

        async def copy_part(number: int, start: int, end: int) -> None:
            async with limiter:
                if errors:
                    return
                try:
                    r = await self._call("upload_part_copy", src, lambda c: c.upload_part_copy(
                        Bucket=self.bucket, Key=self._key(dst), UploadId=upload_id, PartNumber=number,
                        CopySource=source, CopySourceRange=f"bytes={start}-{end - 1}",
                        CopySourceIfMatch=f'"{info.etag}"'))
                except MinervaError as exc:
                    errors.append(exc)
                    return
                etags[number] = r["CopyPartResult"]["ETag"]

        # A failure leaves the upload for the lifecycle rule: AbortMultipartUpload is not allowed.
        async with trio.open_nursery() as nursery:
            for number, start in enumerate(range(0, info.size, part), 1):
                nursery.start_soon(copy_part, number, start, min(start + part, info.size))
        if errors:
            raise errors[0]
        return await self.complete_multipart(dst, upload_id, sorted(etags.items()))

    async def delete(self, path: str) -> None:
        await self._call("delete", path, lambda c: c.delete_object(Bucket=self.bucket, Key=self._key(path)))

