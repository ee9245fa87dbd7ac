"""What first reads fetch: small files and images whole and kept, other heads exactly.

A thumbnailer reads an image's head (the kernel asks for 128 KiB), then the whole file. Before,
the head was an exact ranged GET kept nowhere and the rest a second GET of the first block:
80 GETs for a folder of 40 images, their heads twice. Counted here over the FakeStore, which
notes every ranged GET.
"""

import os
import random

import trio
from test_core import inode_of, run

from minerva_mount import reader
from minerva_mount.core import Core
from minerva_mount.fakestore import FakeStore

KIB, MIB = 1 << 10, 1 << 20


class RangeStore(FakeStore):
    """A FakeStore that notes each GET as (path, start, end)."""

    def __init__(self):
        super().__init__()
        self.gets: list[tuple[str, int, int]] = []

    async def get_range(self, path, start, end, etag=None):
        self.gets.append((path, start, end))
        return await super().get_range(path, start, end, etag)


def run_ranges(test):
    async def main():
        store = RangeStore()
        async with trio.open_nursery() as nursery:
            await test(Core(store, nursery), store)
            nursery.cancel_scope.cancel()
    trio.run(main)


async def read_head_then_whole(core, path: str, same_handle: bool) -> bytes:
    """A thumbnailer: 64 KiB of the head, then the whole file 128 KiB at a time (the kernel's
    reads), in the same open file or in a second one."""
    inode = await inode_of(core, path)
    fh = await core.open(inode, os.O_RDONLY)
    head = bytes(await core.read(fh, 0, 64 * KIB))
    if not same_handle:
        await core.release(fh)
        fh = await core.open(inode, os.O_RDONLY)
    out, offset = bytearray(), 0
    while piece := await core.read(fh, offset, 128 * KIB):
        out += piece
        offset += len(piece)
    await core.release(fh)
    assert bytes(out[:len(head)]) == head
    return bytes(out)


def test_a_folder_of_40_images_costs_one_get_per_image():
    rng = random.Random(12)
    # Thumbnail-sized to phone photos: 20 KiB to 6 MiB, some over one block and over 256 KiB.
    sizes = [rng.randrange(20 * KIB, 400 * KIB) for _ in range(30)]
    sizes += [rng.randrange(1 * MIB, 6 * MIB) for _ in range(10)]
    suffixes = ["jpg", "JPG", "jpeg", "png", "heic", "webp", "gif", "tiff"]

    async def test(core, store):
        images = {}
        for i, size in enumerate(sizes):
            path = f"Outgoing/photos/img{i:02d}.{suffixes[i % len(suffixes)]}"
            images[path] = rng.randbytes(size)
            store.add(path, images[path])
        for i, (path, data) in enumerate(images.items()):
            before = len(store.gets)
            assert await read_head_then_whole(core, path, same_handle=i % 2 == 0) == data
            assert store.gets[before:] == [(path, 0, len(data))], path  # one GET, all of it
        assert store.requests["get"] == 40 and store.requests["head"] == 0
    run_ranges(test)


def test_small_files_of_any_kind_are_read_whole_at_once():
    async def test(core, store):
        data = os.urandom(200 * KIB)
        store.add("Outgoing/table.csv", data)
        assert await read_head_then_whole(core, "Outgoing/table.csv", same_handle=True) == data
        assert store.gets == [("Outgoing/table.csv", 0, 200 * KIB)]
    run_ranges(test)


def test_the_head_of_a_big_file_is_one_exact_get_and_is_remembered():
    async def test(core, store):
        data = os.urandom(2 * MIB)  # the WAN bench's "first 64 KiB of 2 MiB files"
        store.add("Outgoing/h.bin", data)
        inode = await inode_of(core, "Outgoing/h.bin")
        for offset, size in [(0, 64 * KIB), (0, 64 * KIB), (16 * KIB, 4 * KIB)]:
            fh = await core.open(inode, os.O_RDONLY)  # the kernel's pages dropped meanwhile
            assert bytes(await core.read(fh, offset, size)) == data[offset:offset + size]
            await core.release(fh)
        assert store.gets == [("Outgoing/h.bin", 0, 64 * KIB)]  # not a block; once
    run_ranges(test)


def test_an_image_too_big_to_fetch_whole_reads_its_head_exactly():
    async def test(core, store):
        data = os.urandom(reader.WHOLE_IMAGE * MIB + 1)
        store.add("Outgoing/poster.tif", data)
        fh = await core.open(await inode_of(core, "Outgoing/poster.tif"), os.O_RDONLY)
        assert bytes(await core.read(fh, 0, 128 * KIB)) == data[:128 * KIB]
        await core.release(fh)
        assert store.gets == [("Outgoing/poster.tif", 0, 128 * KIB)]
    run_ranges(test)


def test_a_replaced_object_is_never_served_from_remembered_bytes():
    async def test(core, store):
        store.add("Outgoing/v.bin", b"a" * (2 * MIB))
        inode = await inode_of(core, "Outgoing/v.bin")
        fh = await core.open(inode, os.O_RDONLY)
        assert bytes(await core.read(fh, 0, 4 * KIB)) == b"a" * (4 * KIB)
        await core.release(fh)
        store.add("Outgoing/v.bin", b"b" * (2 * MIB))
        store.add("Outgoing/p.png", b"c" * (300 * KIB))
        core.listings.clear()
        inode = await inode_of(core, "Outgoing/v.bin")
        fh = await core.open(inode, os.O_RDONLY)
        assert bytes(await core.read(fh, 0, 4 * KIB)) == b"b" * (4 * KIB)
        await core.release(fh)
        store.add("Outgoing/p.png", b"d" * (300 * KIB))  # same size, new ETag
        core.listings.clear()
        png = await inode_of(core, "Outgoing/p.png")
        fh = await core.open(png, os.O_RDONLY)
        assert bytes(await core.read(fh, 0, 4 * KIB)) == b"d" * (4 * KIB)
        await core.release(fh)
    run(test)


def test_remembered_ranges_stay_within_their_memory_budget():
    async def test(core, store):
        data = os.urandom(64 * MIB)
        store.add("Outgoing/big.bin", data)
        fh = await core.open(await inode_of(core, "Outgoing/big.bin"), os.O_RDONLY)
        rng = random.Random(5)
        for _ in range(400):  # random 64 KiB reads, each far from the one before
            offset = rng.randrange(0, len(data) - 64 * KIB)
            assert bytes(await core.read(fh, offset, 64 * KIB)) == data[offset:offset + 64 * KIB]
            assert core.blocks._exact_used <= reader.EXACT_BYTES
            assert len(core.blocks._exact) <= reader.EXACT_RANGES
        await core.release(fh)
    run(test)
