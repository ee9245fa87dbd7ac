"""One LIST answer as the names a folder shows: folders, files, aliases of shadowed files.

Kept apart from core.py: it is pure (a listing in, a dict of names out), the rule for keys
that are not plain file names lives here alone (SEMANTICS.md, "Keys that are not plain file
names"), and tests can read it in one sitting.
"""

import logging
from dataclasses import replace

from .listings import DIR
from .namespace import INCOMING, OUTGOING, SHADOWED_SUFFIX, join, shown_name
from .store import ObjectInfo

log = logging.getLogger("minerva.core")


def convert_listing(dir_path: str, listing, aliases: dict[str, str], mtimes) -> dict[str, ObjectInfo | None]:
    """Entries by shown name; `aliases` (shown path -> key) is updated for this folder, and
    `mtimes` (path -> (etag, mtime)) supplies mtimes learnt from metadata, which LIST lacks."""
    entries = {}
    for sub in listing.dirs:
        name = sub.rstrip("/")
        if shown_name(name):
            entries[name] = DIR
    shadowed = []
    for info in listing.files:
        name = info.path.rsplit("/", 1)[-1]
        if not shown_name(name):
            log.info("not shown: object %r (name unusable as a file name)", info.path)
        elif name in entries:
            shadowed.append(info)
        else:
            known = mtimes.get(info.path)
            entries[name] = replace(info, mtime=known[1]) if known and known[0] == info.etag else info
    _show_shadowed(dir_path, entries, shadowed, aliases)
    if dir_path == "":
        entries.setdefault(INCOMING, DIR)
        entries.setdefault(OUTGOING, DIR)
    return entries


def _show_shadowed(dir_path: str, entries: dict, shadowed: list[ObjectInfo], aliases: dict[str, str]) -> None:
    """Files whose name a folder also has ('a' and 'a/b'): shown as 'a (file)', read-only.

    The folder keeps the plain name (it holds other files); the file stays readable,
    deletable and renamable under the alias, so neither hides the other.
    """
    for alias in [p for p in aliases if p.rpartition("/")[0] == dir_path]:
        del aliases[alias]
    for info in shadowed:
        alias = info.path.rsplit("/", 1)[-1] + SHADOWED_SUFFIX
        if alias in entries or not shown_name(alias):
            log.info("not shown: object %r (its name and its alias are taken)", info.path)
            continue
        log.info("shown as %r: object %r, whose name a folder also has", alias, info.path)
        entries[alias] = info
        aliases[join(dir_path, alias)] = info.path
