"""Renaming a folder: S3 has no folders, so every object under it is copied, then deleted.

Order, so that nothing is ever missing: every resulting key is checked first (one too long
fails the whole rename with ENAMETOOLONG before any request); all copies complete before the
first delete (the new names show before the old ones go); folder markers (`dir/` keys) are
deleted last, after what they hold, because SeaweedFS (and other S3 servers backed by a file
system) keeps listing an emptied folder until its marker key is deleted after its content.
At most MAX_COPIES requests are in flight (8: a folder of 1,000 small files moves in about
125 round trips instead of 1,000).
"""

import logging

import trio

from .errors import MinervaError, NameTooLong
from .namespace import MAX_KEY_BYTES, MAX_NAME_BYTES
from .store import ObjectInfo

log = logging.getLogger("minerva.core")

MAX_COPIES = 8  # server-side copies in flight while a folder is renamed


def check_keys(src: str, dst: str, objects: list[ObjectInfo]) -> None:
    """ENAMETOOLONG if any key would pass S3's limit under the new name; nothing sent."""
    for info in objects:
        new = dst + info.path[len(src):]
        if len(new.encode()) > MAX_KEY_BYTES or any(
                len(part.encode()) > MAX_NAME_BYTES for part in new.split("/")):
            log.warning("refused rename %s -> %s: %s would be longer than an S3 key may be",
                        src, dst, new)
            raise NameTooLong(f"{new}: longer than an S3 key may be")


async def move_tree(store, src: str, dst: str, objects: list[ObjectInfo]) -> None:
    """Copy every object of `src/` to `dst/`, then delete the originals (markers last)."""
    limiter = trio.CapacityLimiter(MAX_COPIES)
    errors: list[MinervaError] = []

    async def bounded(fn, *args):
        async with limiter:
            if not errors:
                try:
                    await fn(*args)
                except MinervaError as exc:
                    errors.append(exc)

    async def move(info: ObjectInfo) -> None:
        if info.path.endswith("/"):  # a folder marker: empty, made anew
            await store.put(dst + info.path[len(src):], b"", {})
        else:
            await store.copy(info.path, dst + info.path[len(src):], info.size)

    async def each(fn, infos):
        async with trio.open_nursery() as nursery:
            for info in infos:
                nursery.start_soon(bounded, fn, *([info] if fn is move else [info.path]))
        if errors:
            raise errors[0]

    await each(move, objects)
    if not objects:
        await store.put(dst + "/", b"", {})  # an empty folder stays a folder
    await each(store.delete, [info for info in objects if not info.path.endswith("/")])
    markers = sorted((info for info in objects if info.path.endswith("/")), key=lambda i: -len(i.path))
    for info in markers:  # deepest first, each after what it held
        await store.delete(info.path)
    if src + "/" not in {info.path for info in markers}:
        await store.delete(src + "/")  # SeaweedFS keeps an emptied folder until this
