"""Keys that cannot be plain files, and names S3 cannot take.

(Malformed credential answers: tests/test_credentials.py for each field, and
tests/test_credential_expiry.py for a malformed answer reaching a live mount.)

The rule (SEMANTICS.md, "Keys that are not plain file names"): a key is shown as a file when
its last component is a usable name (not empty, not '.' or '..', at most 255 bytes); when a
file and a folder share a name the folder keeps it and the file is shown read-only as
'NAME (file)' (unless that name is taken too); anything not shown is logged and never hides
another entry.
"""

import errno
import logging
import os

import pytest
import trio

from minerva_mount.core import Core
from minerva_mount.fakestore import FakeStore
from minerva_mount.namespace import ROOT_INODE

LONG = "n" * 256  # over the 255-byte limit of a file name
LONG_OK = "é" * 127  # 254 bytes of UTF-8: shown


def test_odd_keys_follow_the_rule_and_never_hide_other_files(mount, local_minerva):
    # What SeaweedFS keeps of these: both 'a' and 'a/b'; a key ending in '/' loses its content
    # (it becomes a folder marker); '//' is folded to '/'; a component over 255 bytes is
    # refused (KeyTooLongError). Those it cannot hold are covered over the fake store below.
    objects = {
        "Incoming/odd/ok.txt": b"fine",
        "Incoming/odd/a": b"file a",
        "Incoming/odd/a/b": b"file a/b",
        "Incoming/odd/c/d": b"file c/d",
        "Incoming/odd/c": b"file c",
        "Incoming/odd/dirkey/": b"",
        f"Incoming/odd/{LONG_OK}": b"long but fine",
        "Incoming/odd/x y+z%41&<é>.txt": b"characters a listing URL-encodes",
    }
    for key, data in objects.items():
        local_minerva.put(key, data)
    odd = mount.path / "Incoming" / "odd"
    assert sorted(os.listdir(odd)) == sorted(["a", "a (file)", "c", "c (file)", "dirkey", "ok.txt", LONG_OK,
                                              "x y+z%41&<é>.txt"])
    assert (odd / "x y+z%41&<é>.txt").read_bytes() == b"characters a listing URL-encodes"
    assert (odd / "ok.txt").read_bytes() == b"fine"
    assert (odd / LONG_OK).read_bytes() == b"long but fine"
    assert (odd / "a (file)").read_bytes() == b"file a" and (odd / "c (file)").read_bytes() == b"file c"
    assert os.listdir(odd / "a") == ["b"] and (odd / "a" / "b").read_bytes() == b"file a/b"
    assert os.listdir(odd / "dirkey") == []
    with pytest.raises(PermissionError):  # the alias is read-only: writing it would not reach 'a'
        (odd / "a (file)").write_bytes(b"x")
    os.rename(odd / "c (file)", odd / "c.txt")  # the way out of the clash: the file gets its own name
    assert local_minerva.get("Incoming/odd/c.txt") == b"file c"
    os.unlink(odd / "a (file)")
    assert sorted(os.listdir(odd)) == sorted(["a", "c", "c.txt", "dirkey", "ok.txt", LONG_OK,
                                              "x y+z%41&<é>.txt"])
    assert mount.proc.poll() is None  # the daemon is alive
    assert "shown as 'a (file)': object 'Incoming/odd/a'" in mount.log()
    assert sorted(local_minerva.keys("Incoming/")) == sorted(
        set(objects) - {"Incoming/odd/a", "Incoming/odd/c"} | {"Incoming/odd/c.txt"})


def test_keys_s3_allows_but_a_file_name_cannot_be_over_the_fake_store(caplog):
    store = FakeStore()
    for key in ["odd/ok.txt", "odd/dirkey/", "odd/p//q", f"odd/{LONG}", "odd/a", "odd/a/b",
                "odd/a (file)", "odd/x/.", "odd/y/../z"]:
        store.add(key, key.encode())

    async def main():
        async with trio.open_nursery() as nursery:
            core = Core(store, nursery)
            odd = await core.lookup(ROOT_INODE, b"odd")
            fh = await core.opendir(odd.inode)
            names = [name for name, _ in core.readdir(fh, 0)]
            assert sorted(names) == ["a", "a (file)", "dirkey", "ok.txt", "p", "x", "y"]
            a_file = await core.lookup(odd.inode, b"a (file)")
            assert a_file.size == len("odd/a (file)")  # the real 'a (file)' keeps its name
            for folder in (b"p", b"x", b"y", b"dirkey"):
                inner = await core.opendir((await core.lookup(odd.inode, folder)).inode)
                assert core.readdir(inner, 0) == []  # '', '.', '..' are no file names
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.INFO, logger="minerva.core"):
        trio.run(main)
    assert f"not shown: object 'odd/{LONG}'" in caplog.text
    assert "not shown: object 'odd/a' (its name and its alias are taken)" in caplog.text


def test_names_s3_cannot_take_get_enametoolong_or_einval(mount, local_minerva):
    incoming = mount.path / "Incoming"
    with pytest.raises(OSError) as too_long:
        open(incoming / ("x" * 256), "wb").close()
    assert too_long.value.errno == errno.ENAMETOOLONG
    with pytest.raises(OSError) as not_utf8:
        os.close(os.open(bytes(incoming) + b"/bad-\xff.txt", os.O_WRONLY | os.O_CREAT))
    assert not_utf8.value.errno == errno.EINVAL
    with pytest.raises(OSError) as not_utf8_dir:
        os.mkdir(bytes(incoming) + b"/bad-\xfe")
    assert not_utf8_dir.value.errno == errno.EINVAL
    deep = incoming
    with pytest.raises(OSError) as key_too_long:
        for level in range(5):  # each level adds 241 bytes: the key passes S3's limit
            deep = deep / f"{level}{'d' * 240}"
            os.mkdir(deep)
    assert key_too_long.value.errno == errno.ENAMETOOLONG
    assert mount.proc.poll() is None
    keys = local_minerva.keys()
    assert all(len(k.encode()) <= 1024 for k in keys)
