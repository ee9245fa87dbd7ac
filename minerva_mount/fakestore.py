"""An in-memory store with the S3Store interface, for unit tests of the core.

It keeps S3's visible semantics (an object appears at PUT or CompleteMultipartUpload, not
before; listings split on '/'), counts requests like S3Store, and can be told to fail.
"""

import hashlib
import time
from collections import Counter

import trio

from .errors import NotFound, StoreError
from .store import Listing, ObjectChanged, ObjectInfo


class FakeStore:
    def __init__(self):
        self.objects: dict[str, tuple[bytes, ObjectInfo]] = {}
        self.uploads: dict[str, tuple[str, dict[int, bytes], dict[str, str]]] = {}
        self.requests: Counter[str] = Counter()
        self.fail_kinds: set[str] = set()

    async def _enter(self, kind: str) -> None:
        self.requests[kind] += 1
        await trio.sleep(0)
        if kind in self.fail_kinds:
            raise StoreError(f"{kind}: injected failure")

    def add(self, path: str, data: bytes, metadata: dict[str, str] | None = None) -> ObjectInfo:
        metadata = dict(metadata or {})
        mtime = float(metadata.get("mtime", time.time()))
        info = ObjectInfo(path, len(data), mtime, hashlib.md5(data).hexdigest(), metadata)
        self.objects[path] = (data, info)
        return info

    async def list_dir(self, path: str) -> Listing:
        await self._enter("list")
        return self._listing(path)

    async def list_dir_page(self, path: str) -> Listing | None:
        await self._enter("list")
        listing = self._listing(path)
        return listing if len(listing.files) + len(listing.dirs) <= 1000 else None

    def _listing(self, path: str) -> Listing:
        files, dirs = [], set()
        for key, (_, info) in sorted(self.objects.items()):
            if not key.startswith(path) or key == path:
                continue
            rest = key[len(path):]
            if "/" in rest:
                dirs.add(rest.split("/", 1)[0] + "/")
            else:
                files.append(info)
        return Listing(files, sorted(dirs))

    async def list_tree(self, path: str) -> list[ObjectInfo]:
        await self._enter("list")
        return [info for key, (_, info) in sorted(self.objects.items()) if key.startswith(path)]

    async def has_children(self, path: str) -> bool:
        await self._enter("list")
        return any(k.startswith(path) and k != path for k in self.objects)

    async def head(self, path: str) -> ObjectInfo:
        await self._enter("head")
        if path not in self.objects:
            raise NotFound(f"head {path}")
        return self.objects[path][1]

    async def get_range(self, path: str, start: int, end: int, etag: str | None = None) -> bytes:
        await self._enter("get")
        if path not in self.objects:
            raise NotFound(f"get {path}")
        data, info = self.objects[path]
        if etag and info.etag != etag:
            raise ObjectChanged(f"get {path}")
        return data[start:end]

    async def get_blocks(self, path: str, start: int, end: int, block_size: int,
                         etag: str | None = None) -> list[bytes]:
        data = await self.get_range(path, start, end, etag)
        return [data[i:i + block_size] for i in range(0, len(data), block_size)]

    async def put(self, path: str, data: bytes, metadata: dict[str, str]) -> str:
        await self._enter("put")
        return self.add(path, bytes(data), metadata).etag

    async def create_multipart(self, path: str, metadata: dict[str, str]) -> str:
        await self._enter("create_multipart")
        upload_id = f"upload-{len(self.uploads) + 1}"
        self.uploads[upload_id] = (path, {}, dict(metadata))
        return upload_id

    async def upload_part(self, path: str, upload_id: str, number: int, data: bytes) -> str:
        await self._enter("upload_part")
        self.uploads[upload_id][1][number] = bytes(data)
        return hashlib.md5(data).hexdigest()

    async def complete_multipart(self, path: str, upload_id: str, parts: list[tuple[int, str]]) -> str:
        await self._enter("complete_multipart")
        _, stored, metadata = self.uploads.pop(upload_id)
        return self.add(path, b"".join(stored[n] for n, _ in parts), metadata).etag

    async def copy(self, src: str, dst: str, size: int | None = None) -> str:
        await self._enter("copy")
        if src not in self.objects:
            raise NotFound(f"copy {src}")
        data, info = self.objects[src]
        return self.add(dst, data, info.metadata).etag

    async def delete(self, path: str) -> None:
        await self._enter("delete")
        self.objects.pop(path, None)
