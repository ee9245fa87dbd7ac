"""Unit tests of the listing cache and the refresher, over the in-memory FakeStore."""

import errno

import trio
import trio.testing
from test_core import WRITE_NEW, expect_errno, inode_of, listing, run, write_file

from minerva_mount.core import Core
from minerva_mount.fakestore import FakeStore
from minerva_mount.listings import Change, ListingCache
from minerva_mount.namespace import ROOT_INODE, InodeTable


def drain(changes) -> set[tuple[str, str]]:
    found = set()
    while True:
        try:
            change: Change = changes.receive_nowait()
        except trio.WouldBlock:
            return found
        found.add((change.kind, change.name))


def test_complete_listing_answers_absent_names_without_requests():
    async def test(core, store):
        outgoing = await inode_of(core, "Outgoing")
        listing(core, await core.opendir(outgoing))
        before = store.requests.copy()
        for name in (b".hidden", b"autorun.inf", b".Trash-1000", b"desktop.ini"):
            await expect_errno(errno.ENOENT, core.lookup(outgoing, name))
        assert store.requests == before
    run(test)


class CountingStore(FakeStore):
    """A FakeStore that notes which folders it listed, and can hold LISTs until `gate` opens."""

    def __init__(self):
        super().__init__()
        self.listed: list[str] = []
        self.gate = trio.Event()
        self.gate.set()

    async def list_dir(self, path):
        self.listed.append(path)
        await self.gate.wait()
        return await super().list_dir(path)

    async def list_dir_page(self, path):
        self.listed.append(path)
        await self.gate.wait()
        return await super().list_dir_page(path)


async def cold_outgoing(core, store: CountingStore) -> int:
    """Outgoing's inode, with nothing listed any more and nothing counted yet."""
    outgoing = await inode_of(core, "Outgoing")
    await trio.testing.wait_all_tasks_blocked()  # what that walk listed ahead is done
    core.listings.clear()
    store.listed.clear()
    return outgoing


def test_concurrent_lookups_in_a_cold_folder_share_one_list():
    async def test(core, store):
        store.add("Outgoing/a.csv", b"a")
        outgoing = await cold_outgoing(core, store)
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(core.lookup, outgoing, b"a.csv")
        await trio.testing.wait_all_tasks_blocked()
        # the folder once, and once what a walk would go into next (a.csv is a file: not kept)
        assert sorted(store.listed) == ["Outgoing/", "Outgoing/a.csv/"]
        assert core.listings.get("Outgoing/a.csv") is None
    run(test, store=CountingStore())


def test_a_cold_path_walk_lists_the_next_folder_beside_its_parent():
    """`head -c 1 Outgoing/a/b/c/file` on a fresh mount: the kernel looks up one level at a
    time; each cold lookup lists the next level at the same time, so the walk waits for two
    rounds of LISTs instead of four."""
    async def test(core, store):
        store.add("Outgoing/a/b/c/file", b"first byte")
        outgoing = await cold_outgoing(core, store)
        store.gate = trio.Event()
        rounds = []
        async with trio.open_nursery() as nursery:
            async def walk():
                node = outgoing
                for name in (b"a", b"b", b"c", b"file"):
                    node = (await core.lookup(node, name)).inode
                nursery.cancel_scope.cancel()
            nursery.start_soon(walk)
            while True:  # each round: let what is waiting get listed, as one round trip would
                await trio.testing.wait_all_tasks_blocked()
                rounds.append(sorted(store.listed))
                store.listed.clear()
                waiting, store.gate = store.gate, trio.Event()  # later LISTs wait for the next round
                waiting.set()
        assert rounds == [["Outgoing/", "Outgoing/a/"], ["Outgoing/a/b/", "Outgoing/a/b/c/"]]
        assert core.listings.get("Outgoing/a/b/c") is not None  # a folder: its listing is kept
    run(test, store=CountingStore())


class GatedStore(FakeStore):
    """A FakeStore whose LISTs wait until `gate` is set."""

    def __init__(self):
        super().__init__()
        self.gate = trio.Event()

    async def list_dir(self, path):
        await self.gate.wait()
        return await super().list_dir(path)


def test_listing_taken_before_a_change_through_the_mount_is_not_cached():
    async def main():
        store = GatedStore()
        async with trio.open_nursery() as nursery:
            core = Core(store, nursery, listing_ttl=30)
            nursery.start_soon(core.listings.fetch, "Incoming")
            await trio.testing.wait_all_tasks_blocked()  # the LIST is in flight
            core.listings.forget("Incoming")
            store.gate.set()
        assert "Incoming" not in core.listings
        await core.listings.fetch("Incoming")
        assert "Incoming" in core.listings
    trio.run(main)


def test_refresh_reports_what_the_kernel_may_hold():
    async def test(core, store):
        store.add("Outgoing/kept.csv", b"same")
        store.add("Outgoing/changed.csv", b"old")
        store.add("Outgoing/gone.csv", b"bye")
        outgoing = await inode_of(core, "Outgoing")
        listing(core, await core.opendir(outgoing))
        for name in (b"kept.csv", b"changed.csv", b"gone.csv"):
            await core.lookup(outgoing, name)
        await expect_errno(errno.ENOENT, core.lookup(outgoing, b"new.csv"))
        drain(core.listings.changes)

        store.add("Outgoing/changed.csv", b"new content")
        store.add("Outgoing/new.csv", b"fresh")
        store.add("Outgoing/unseen.csv", b"nobody looked it up")
        del store.objects["Outgoing/gone.csv"]
        assert await core.listings.refresh_once() >= 1
        assert drain(core.listings.changes) == {
            ("changed", "changed.csv"), ("added", "new.csv"), ("removed", "gone.csv")}
        assert (await core.lookup(outgoing, b"changed.csv")).size == len(b"new content")
        await expect_errno(errno.ENOENT, core.lookup(outgoing, b"gone.csv"))
        assert await core.listings.refresh_once() >= 1
        assert drain(core.listings.changes) == set()
    run(test)


def test_own_uploads_are_not_reported_removed_while_written():
    async def test(core, store):
        await write_file(core, "Incoming/a.txt", b"1")
        incoming = await inode_of(core, "Incoming")
        listing(core, await core.opendir(incoming))
        await core.listings.refresh_once()
        drain(core.listings.changes)
        fh, _ = await core.create(incoming, b"a.txt", WRITE_NEW)
        await core.write(fh, 0, b"longer now")
        await core.listings.refresh_once()
        assert drain(core.listings.changes) == set()
        await core.flush(fh)
        await core.release(fh)
        assert store.objects["Incoming/a.txt"][0] == b"longer now"
    run(test)


def test_folders_in_use_are_bounded_and_open_handles_count():
    async def main():
        cache = ListingCache(FakeStore(), InodeTable(), {}, ttl=30, watch_max=3)
        for n in range(10):
            cache.opened(n, f"Outgoing/d{n}")
            cache.closed(n)
        assert len(cache.watched()) == 3
        cache.opened(99, "Outgoing/open")
        for n in range(10):
            cache.opened(100 + n, f"Incoming/d{n}")
            cache.closed(100 + n)
        assert "Outgoing/open" in cache.watched() and len(cache.watched()) == 4
    trio.run(main)


def test_readdir_entry_forgotten_since_opendir_stays_resolvable():
    async def test(core, store):
        store.add("Outgoing/a.csv", b"a")
        outgoing = await inode_of(core, "Outgoing")
        node = await core.lookup(outgoing, b"a.csv")
        fh = await core.opendir(outgoing)
        core.forget(node.inode, node.lookups)  # the kernel drops it while the snapshot is held
        for _, entry in core.readdir(fh, 0):
            core.remember(entry)
        assert (await core.getattr(node.inode)).size == 1
    run(test)


def test_listing_a_folder_again_shows_every_change_and_only_live_nodes():
    """A folder listed again unchanged reuses the last opendir's work; any change shows."""
    async def test(core, store):
        for name in ("a.csv", "b.csv", "c.csv"):
            store.add(f"Incoming/{name}", name.encode())
        incoming = await inode_of(core, "Incoming")

        def entries(fh):
            found = {name: entry for name, entry in core.readdir(fh, 0)}
            for entry in found.values():
                core.remember(entry)  # the kernel takes each entry (readdirplus)
            core.releasedir(fh)
            return found

        first = entries(await core.opendir(incoming))
        assert list(first) == ["a.csv", "b.csv", "c.csv"]
        before = store.requests.copy()
        assert entries(await core.opendir(incoming)) == first
        assert store.requests == before

        core.forget(first["a.csv"].inode, first["a.csv"].lookups)  # the kernel drops one
        again = entries(await core.opendir(incoming))
        assert (await core.getattr(again["a.csv"].inode)).size == 5  # a.csv: still resolvable
        core.forget(again["a.csv"].inode, again["a.csv"].lookups)
        looked_up = await core.lookup(incoming, b"a.csv")  # a new node for the name
        assert entries(await core.opendir(incoming))["a.csv"].inode == looked_up.inode
        await core.unlink(incoming, b"b.csv")
        assert list(entries(await core.opendir(incoming))) == ["a.csv", "c.csv"]

        fh, _ = await core.create(incoming, b"new.csv", WRITE_NEW)  # shown while written
        assert list(entries(await core.opendir(incoming))) == ["a.csv", "c.csv", "new.csv"]
        await core.write(fh, 0, b"12345678")
        await core.flush(fh)
        await core.release(fh)
        shown = entries(await core.opendir(incoming))
        assert list(shown) == ["a.csv", "c.csv", "new.csv"] and shown["new.csv"].size == 8

        store.add("Incoming/d.csv", b"d")  # made elsewhere: shows at the next LIST
        await core.listings.refresh_once()
        assert list(entries(await core.opendir(incoming))) == ["a.csv", "c.csv", "d.csv", "new.csv"]
    run(test)


def test_root_listing_keeps_incoming_and_outgoing():
    async def test(core, store):
        assert listing(core, await core.opendir(ROOT_INODE)) == ["Incoming", "Outgoing"]
        await core.listings.refresh_once()
        assert drain(core.listings.changes) == set()
    run(test)


def test_core_uses_the_listing_cache():
    async def main():
        async with trio.open_nursery() as nursery:
            core = Core(FakeStore(), nursery, listing_ttl=7)
            assert isinstance(core.listings, ListingCache) and core.listings.ttl == 7
            nursery.cancel_scope.cancel()
    trio.run(main)
