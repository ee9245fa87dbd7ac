"""The refresher's schedule for folders in use, on trio's MockClock over the FakeStore.

Ten minutes of a folder left on screen take a few milliseconds: the clock jumps to the next
deadline whenever every task waits (autojump_threshold=0), and the FakeStore answers at once,
so every LIST starts at an exact second of the schedule the module docstring of listings.py
states. The counts are those of the issue: an unchanged folder of 1,000 objects kept open
(opendir held, as a file manager does) for ten minutes cost 81 LISTs before this schedule.
"""

import trio
import trio.testing
from test_core import inode_of as walk

from minerva_mount import listings
from minerva_mount.core import Core
from minerva_mount.fakestore import FakeStore

TEN_MINUTES = 600.0


class TimedStore(FakeStore):
    """A FakeStore that notes when each LIST of each folder started."""

    def __init__(self):
        super().__init__()
        self.lists: dict[str, list[float]] = {}

    async def list_dir(self, path: str):
        self.lists.setdefault(path.rstrip("/"), []).append(trio.current_time())
        return await super().list_dir(path)

    async def list_dir_page(self, path: str):  # a lookup's list-ahead (listings.list_ahead)
        self.lists.setdefault(path.rstrip("/"), []).append(trio.current_time())
        return await super().list_dir_page(path)


def fill(store: FakeStore, folder: str, count: int) -> None:
    for i in range(count):
        store.add(f"{folder}/f{i:06d}.csv", b"x")


async def inode_of(core, path: str) -> int:
    """The folder's inode, its parents listed first: the lookups then list nothing ahead
    (listings.list_ahead), so the LISTs counted here are the refresher's and opendir's."""
    parts = path.split("/")
    for depth in range(len(parts)):
        await core.listings.fetch("/".join(parts[:depth]))
    return await walk(core, path)


def on_mock_clock(test, refresh_interval: float = 10.0):
    """Run `test(core, store)` at virtual time 0 with the refresher going; the mount's TTL."""
    async def main():
        store = TimedStore()
        async with trio.open_nursery() as nursery:
            core = Core(store, nursery, listing_ttl=30)
            nursery.start_soon(core.listings.refresh_loop, refresh_interval)
            await test(core, store)
            nursery.cancel_scope.cancel()
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def open_folder(core, path: str) -> tuple[int, float]:
    """opendir as a file manager showing the folder: the handle and the virtual time."""
    return await core.opendir(await inode_of(core, path)), trio.current_time()


def test_unchanged_open_folder_of_1000_objects_costs_22_lists_in_ten_minutes():
    async def test(core, store):
        fill(store, "Outgoing/big", 1000)
        big = await inode_of(core, "Outgoing/big")  # lists Outgoing/, not watched: not opened
        before, t0 = store.requests["list"], trio.current_time()
        fh = await core.opendir(big)
        await trio.sleep(TEN_MINUTES + 0.5)
        core.releasedir(fh)
        times = [t - t0 for t in store.lists["Outgoing/big"]]
        # The opening LIST, then 10 s, doubled while unchanged up to the 30 s bound.
        assert times == [0, 10, 30] + [60 + 30 * i for i in range(19)]
        assert store.requests["list"] - before == len(times) == 22  # 81 before the backoff
    on_mock_clock(test)


def test_a_change_elsewhere_shows_within_30_s_and_restarts_the_schedule():
    async def test(core, store):
        fill(store, "Outgoing/live", 10)
        fh, t0 = await open_folder(core, "Outgoing/live")
        await trio.sleep_until(t0 + 100.5)  # backed off: LISTs at 90 and 120
        store.add("Outgoing/live/export.csv", b"new")
        await trio.sleep_until(t0 + 120.5)
        assert "export.csv" in core.listings.get("Outgoing/live")  # seen 19.5 s after
        await trio.sleep_until(t0 + 200.5)
        times = [t - t0 for t in store.lists["Outgoing/live"]]
        assert times == [0, 10, 30, 60, 90, 120, 130, 150, 180]  # from 10 s again
        core.releasedir(fh)
    on_mock_clock(test)


def test_a_new_use_or_a_change_through_the_mount_restarts_the_schedule():
    async def test(core, store):
        fill(store, "Incoming/work", 10)
        fh, t0 = await open_folder(core, "Incoming/work")
        await trio.sleep_until(t0 + 95)  # LISTs at 0, 10, 30, 60, 90
        again = await core.opendir(await inode_of(core, "Incoming/work"))  # ls in a terminal
        await trio.sleep_until(t0 + 135)  # 100 (10 on), 120 (20 on, then 30)
        await core.unlink(await inode_of(core, "Incoming/work"), b"f000001.csv")
        await trio.sleep_until(t0 + 150)  # 10 on from 120 is past: at once, then 20 on
        times = [t - t0 for t in store.lists["Incoming/work"]]
        assert times == [0, 10, 30, 60, 90, 100, 120, 135], times
        core.releasedir(again)
        core.releasedir(fh)
    on_mock_clock(test)


def test_a_short_look_costs_five_lists_after_its_own_and_none_after_ten_minutes():
    async def test(core, store):
        fill(store, "Outgoing/glance", 346)
        fh, t0 = await open_folder(core, "Outgoing/glance")
        core.releasedir(fh)  # closed at once: in use for the watch window (10 minutes)
        await trio.sleep(2 * TEN_MINUTES)
        times = [t - t0 for t in store.lists["Outgoing/glance"]]
        assert times == [0, 10, 30, 70, 150, 310]  # 10 s doubling up to 300 s; 80 before
    on_mock_clock(test)


def test_big_folders_are_re_listed_at_most_a_page_per_30_s_and_huge_ones_only_when_used():
    async def test(core, store):
        fill(store, "Outgoing/p5", 5 * listings.PAGE)  # 5 pages: every 150 s at most
        fill(store, "Outgoing/p11", (listings.MAX_PAGES + 1) * listings.PAGE)
        fh5, t0 = await open_folder(core, "Outgoing/p5")
        fh11, _ = await open_folder(core, "Outgoing/p11")
        await trio.sleep(TEN_MINUTES + 0.5)
        assert [t - t0 for t in store.lists["Outgoing/p5"]] == [0, 150, 300, 450, 600]
        assert len(store.lists["Outgoing/p11"]) == 1  # its opening LIST only
        core.releasedir(fh5)
        core.releasedir(fh11)
    on_mock_clock(test)


def test_background_listing_keeps_within_its_budget_open_folders_first():
    async def test(core, store):
        folders = [f"Outgoing/d{i:03d}" for i in range(120)]  # twice what the budget covers
        for folder in [*folders, "Incoming/closed"]:
            store.add(f"{folder}/a.csv", b"x")
        handles = [(await open_folder(core, folder))[0] for folder in folders]
        closed = (await open_folder(core, "Incoming/closed"))[0]
        core.releasedir(closed)
        t0, before = trio.current_time(), store.requests["list"]
        await trio.sleep(TEN_MINUTES)
        spent = store.requests["list"] - before
        assert spent <= listings.BUDGET * TEN_MINUTES / 60 + listings.BURST
        assert spent >= listings.BUDGET * TEN_MINUTES / 60 - 1  # the budget is used, not idle
        # Shared in turn: each open folder re-listed every ~120 s (4 or 5 times), the closed
        # one only when no open folder is due, which with 120 of them is never.
        counts = [len([t for t in store.lists[folder] if t > t0]) for folder in folders]
        assert min(counts) >= 4 and max(counts) <= 6, counts
        assert [t for t in store.lists["Incoming/closed"] if t > t0] == []
        for fh in handles:
            core.releasedir(fh)
    on_mock_clock(test)


def test_a_failing_folder_backs_off_too_and_recovers():
    async def test(core, store):
        fill(store, "Outgoing/flaky", 3)
        fh, t0 = await open_folder(core, "Outgoing/flaky")
        store.fail_kinds.add("list")
        await trio.sleep_until(t0 + 65)
        store.fail_kinds.clear()
        store.add("Outgoing/flaky/new.csv", b"1")
        await trio.sleep_until(t0 + 95)
        times = [t - t0 for t in store.lists["Outgoing/flaky"]]
        assert times == [0, 10, 30, 60, 90]  # failed at 10, 30, 60; listed again at 90
        assert "new.csv" in core.listings.get("Outgoing/flaky")
        core.releasedir(fh)
    on_mock_clock(test)


def test_a_refresh_interval_longer_than_the_bounds_is_kept():
    async def test(core, store):
        fh, t0 = await open_folder(core, "Outgoing")
        await trio.sleep(TEN_MINUTES + 0.5)
        assert [t - t0 for t in store.lists["Outgoing"]] == [0, 300, 600]
        core.releasedir(fh)
    on_mock_clock(test, refresh_interval=300)
