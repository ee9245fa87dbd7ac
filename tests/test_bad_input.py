"""Keys that cannot be plain files, and names S3 cannot take.

(Malformed credential answers: tests/test_credentials.py for each field, and
tests/test_credential_expiry.py for a malformed answer reaching a live mount.)

The rule (SEMANTICS.md, "Keys that are not plain file names"): a key is shown as a file when
its last component is a usable name (not empty, not '.' or '..', at most 255 bytes); when a
file and a folder share a name the folder is shown, since it holds other files; everything
not shown is logged once per listing and never hides any other entry.
"""

import errno
import os

import pytest

LONG = "n" * 300  # over the 255-byte limit of a file name
LONG_OK = "é" * 127  # 254 bytes of UTF-8: shown


def test_odd_keys_follow_the_rule_and_never_hide_other_files(mount, local_minerva):
    objects = {
        "Incoming/odd/ok.txt": b"fine",
        "Incoming/odd/dirkey/": b"content under a key ending in a slash",
        "Incoming/odd/a": b"file a",
        "Incoming/odd/a/b": b"file a/b",
        "Incoming/odd/p//q": b"double slash",
        f"Incoming/odd/{LONG}": b"too long",
        f"Incoming/odd/{LONG_OK}": b"long but fine",
    }
    for key, data in objects.items():
        local_minerva.put(key, data)
    odd = mount.path / "Incoming" / "odd"
    assert sorted(os.listdir(odd)) == sorted(["a", "dirkey", "ok.txt", "p", LONG_OK])
    assert (odd / "ok.txt").read_bytes() == b"fine"
    assert (odd / LONG_OK).read_bytes() == b"long but fine"
    assert os.listdir(odd / "a") == ["b"] and (odd / "a" / "b").read_bytes() == b"file a/b"
    assert os.listdir(odd / "dirkey") == []
    assert os.listdir(odd / "p") == []
    assert mount.proc.poll() is None  # the daemon is alive
    log = mount.log()
    assert "not shown: object 'Incoming/odd/a'" in log
    assert f"not shown: object 'Incoming/odd/{LONG}'" in log
    # Nothing was changed in the bucket by looking.
    assert sorted(local_minerva.keys("Incoming/")) == sorted(objects)


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
