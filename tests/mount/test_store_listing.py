"""S3Store.list_dir against the local Minerva: it reads LIST pages itself (not with botocore's
parser) and fetches each page while parsing the one before, so these check that what it returns
is what S3 holds, and that a failure on a later page comes back as the typed error with its errno.
"""

import errno
from concurrent.futures import ThreadPoolExecutor

import botocore.awsrequest
import pytest
import trio

from minerva_mount.credentials import CredentialProvider
from minerva_mount.errors import AccessDenied, StoreError
from minerva_mount.store import S3Store

FOLDER = "Outgoing/paged"
COUNT = 2_100  # three pages of at most 1,000 keys
ODD = ["x y+z%41&<é>.txt", "plus+sign", "semi;colon,comma", "日本語.csv"]


@pytest.fixture(scope="module")
def paged(local_minerva):
    """COUNT objects plus odd names and one sub-folder, as a pipeline leaves them."""
    local_minerva.wipe()
    admin = local_minerva.admin()
    keys = [f"{FOLDER}/f{i:05d}.csv" for i in range(COUNT)] + [f"{FOLDER}/{n}" for n in ODD]
    keys.append(f"{FOLDER}/sub/inner.txt")

    def put(key: str) -> None:
        admin.put_object(Bucket=local_minerva.bucket, Key=local_minerva.prefix + key,
                         Body=b"x" * (len(key) % 50))
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(put, keys))
    yield local_minerva
    local_minerva.wipe()


def listed_by_boto3(local) -> dict[str, tuple[int, float, str]]:
    pages = local.admin().get_paginator("list_objects_v2").paginate(
        Bucket=local.bucket, Prefix=f"{local.prefix}{FOLDER}/", Delimiter="/")
    return {obj["Key"][len(local.prefix):]:
            (obj["Size"], obj["LastModified"].timestamp(), obj["ETag"].strip('"'))
            for page in pages for obj in page.get("Contents", [])}


def with_store(local, action, retry_timeout: float = 60.0):
    async def main():
        provider = CredentialProvider(local.api_url, local.info["api_key"])
        async with trio.open_nursery() as nursery:
            await nursery.start(provider.start)
            store = S3Store(provider, local.info["s3_endpoint"], retry_timeout=retry_timeout)
            try:
                return await action(store)
            finally:
                nursery.cancel_scope.cancel()
    return trio.run(main)


def test_a_folder_of_three_pages_lists_as_s3_holds_it(paged):
    async def action(store):
        return await store.list_dir(FOLDER + "/"), store.requests.copy()
    listing, requests = with_store(paged, action)
    assert requests == {"list": 3}
    assert listing.dirs == ["sub/"]
    got = {info.path: (info.size, info.mtime, info.etag) for info in listing.files}
    assert got == listed_by_boto3(paged)
    assert len(got) == COUNT + len(ODD) and {f"{FOLDER}/{n}" for n in ODD} <= got.keys()


def failing_after(store, pages: int, status: int, body: bytes) -> None:
    """From the (pages+1)-th LIST on, S3's answer is replaced by `status` and `body`."""
    real, sent = store._http.send, []

    def send(request):
        sent.append(request)
        if len(sent) <= pages:
            return real(request)
        return botocore.awsrequest.AWSResponse(request.url, status, {}, _Raw(body))
    store._http.send = send


class _Raw:
    def __init__(self, body: bytes):
        self.body = body

    def stream(self, *args, **kwargs):
        yield self.body


def test_a_later_page_refused_raises_access_denied_with_its_errno(paged):
    denied = b"<?xml version='1.0'?><Error><Code>AccessDenied</Code><Message>no</Message></Error>"

    async def action(store):
        await store.list_dir("")  # the HTTP session exists from here on
        failing_after(store, 1 + 1, 403, denied)
        with pytest.raises(AccessDenied) as info:
            await store.list_dir(FOLDER + "/")
        return info.value
    error = with_store(paged, action)
    assert error.errno == errno.EACCES and "403 AccessDenied" in str(error)


def test_a_later_page_cut_off_is_retried_then_fails_with_eio(paged):
    cut = b'<?xml version="1.0"?><ListBucketResult><Contents><Key>acme/Outg'

    async def action(store):
        await store.list_dir("")
        failing_after(store, 1 + 1, 200, cut)
        with pytest.raises(StoreError) as info:
            await store.list_dir(FOLDER + "/")
        return info.value, store.requests["list"]
    error, lists = with_store(paged, action, retry_timeout=1.0)
    assert error.errno == errno.EIO and "InternalError" in str(error)
    assert lists > 3  # the root, the first page, then the second page again and again
