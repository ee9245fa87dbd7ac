"""What S3 answers, as plain data: object info, LIST pages, errors mapped to typed errors.

Kept apart from store.py, which sends requests: everything here is pure (bytes or a
botocore ClientError in, values out), so it can be read, and tested, without a network.
"""

import contextlib
import datetime
import html
import logging
import re
import urllib.parse
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field

import botocore.exceptions
import botocore.utils

from .errors import AccessDenied, MinervaError, NotFound, ObjectChanged, StoreError

log = logging.getLogger("minerva.store")

MTIME_META = "mtime"  # user metadata key (x-amz-meta-mtime), as s3fs and rclone use
# Logged with every AccessDenied S3 answers: the test suite counts these and expects none,
# since the client must never send a request outside the org prefix or the allowed actions.
ACCESS_DENIED_MARKER = "S3-ACCESS-DENIED"
RETRY_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestTimeout",
    "InternalError", "ServiceUnavailable", "RequestTimeTooSkewed", "OperationAborted",
})
S3_XMLNS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


@dataclass(frozen=True)
class ObjectInfo:
    path: str
    size: int
    mtime: float
    etag: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class Listing:
    """One folder level: objects directly inside, and the names of sub-folders."""

    files: list[ObjectInfo]
    dirs: list[str]


def parse_timestamp(text: str) -> datetime.datetime:
    """botocore's timestamp parser with a fast path for the ISO 8601 times LIST answers carry.

    botocore's own (dateutil) costs ~40 us per key, most of the CPU time of a 1,000-key LIST
    page; `fromisoformat` takes ~1 us. Other forms (HEAD's RFC 1123 Last-Modified) go to
    botocore's.
    """
    try:
        parsed = datetime.datetime.fromisoformat(text)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:  # not ISO 8601, or no zone: botocore decides
        return botocore.utils.parse_timestamp(text)
    return parsed


def object_info(path: str, size: int, last_modified, etag: str, metadata=None) -> ObjectInfo:
    metadata = metadata or {}
    mtime = last_modified.timestamp()
    with contextlib.suppress(ValueError):
        mtime = float(metadata.get(MTIME_META, mtime))
    return ObjectInfo(path, size, mtime, etag.strip('"'), metadata)


@dataclass
class _Page:
    files: list[ObjectInfo]
    dirs: list[str]


_NEXT_TOKEN = re.compile(rb"<NextContinuationToken>([^<]+)</NextContinuationToken>")


def next_token(body: bytes) -> str | None:
    """The continuation token of a raw ListBucketResult, None on the last page. Keys cannot
    contain the tag: '<' in a key is escaped in XML (and URL-encoded with EncodingType=url)."""
    if b"<IsTruncated>true</IsTruncated>" not in body or (found := _NEXT_TOKEN.search(body)) is None:
        return None
    return html.unescape(found.group(1).decode())


def parse_list_page(body: bytes, base: str, path: str) -> _Page:
    """A ListBucketResult (keys URL-encoded, EncodingType=url) as ObjectInfo for `path`."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as exc:
        raise StoreError(f"list {path}: S3 answered a listing that is not XML ({exc})") from None
    files, dirs = [], []
    unquote, skip = urllib.parse.unquote_plus, len(base)
    contents, prefixes = S3_XMLNS + "Contents", S3_XMLNS + "CommonPrefixes"
    key_tag, size_tag, time_tag, etag_tag = (S3_XMLNS + t for t in ("Key", "Size", "LastModified", "ETag"))
    mtimes: dict[str, float] = {}  # objects written together share their LastModified text
    for element in root:
        tag = element.tag
        if tag == contents:
            key, size, stamp, etag = "", "0", "", ""
            for field_ in element:  # one pass over the fields: findtext per field costs more
                if field_.tag == key_tag:
                    key = field_.text or ""
                elif field_.tag == size_tag:
                    size = field_.text or "0"
                elif field_.tag == time_tag:
                    stamp = field_.text or ""
                elif field_.tag == etag_tag:
                    etag = field_.text or ""
            rel = (unquote(key) if "%" in key or "+" in key else key)[skip:]
            if not rel:  # the folder's own marker object
                continue
            if (mtime := mtimes.get(stamp)) is None:
                mtime = mtimes[stamp] = parse_timestamp(stamp).timestamp()
            files.append(ObjectInfo(path + rel, int(size), mtime, etag.strip('"'), {}))
        elif tag == prefixes:
            dirs.append(unquote(element.findtext(S3_XMLNS + "Prefix", ""))[skip:])
    return _Page(files, dirs)


def client_error(status: int, body: bytes, operation: str) -> botocore.exceptions.ClientError:
    """The ClientError botocore would raise for an S3 error answer, for `_call` to map."""
    try:
        error = {e.tag.rpartition("}")[2]: e.text for e in ElementTree.fromstring(body)}
    except ElementTree.ParseError:
        error = {}
    code = error.get("Code") or ("InternalError" if status == 200 else str(status))  # 200: cut off
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": error.get("Message") or ""},
         "ResponseMetadata": {"HTTPStatusCode": status}}, operation)


def map_client_error(exc: botocore.exceptions.ClientError, kind: str, path: str) -> MinervaError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    what = f"{kind} {path}: S3 answered {status} {code}"
    if code in ("NoSuchKey", "NotFound", "404") or status == 404:
        return NotFound(what)
    if code in ("PreconditionFailed",) or status == 412:
        return ObjectChanged(what)
    if code == "AccessDenied":
        log.error("%s %s", ACCESS_DENIED_MARKER, what)
        return AccessDenied(what)
    return StoreError(what)


def retryable(exc: botocore.exceptions.ClientError) -> bool:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    return code in RETRY_CODES or status >= 500 or status == 429
