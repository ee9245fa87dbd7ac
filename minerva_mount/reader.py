"""Reads of one open file: ranged GETs, with a window that grows while reads are sequential.

The kernel asks for at most 128 KiB at a time; one GET per request would make every read
pay a round trip. So a sequential reader gets a window fetched ahead, doubling up to
`max_window`, while a random reader (a thumbnailer reading 64 KiB) fetches only what it
asked for. A seek resets the window.
"""

from .store import ObjectInfo

MIN_WINDOW = 1 << 20
MAX_WINDOW = 16 << 20


class Reader:
    def __init__(self, store, info: ObjectInfo, max_window: int = MAX_WINDOW):
        self._store = store
        self._info = info
        self._max_window = max_window
        self._window = MIN_WINDOW
        self._next_offset = 0
        self._buf_start = 0
        self._buf = b""

    async def read(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self._info.size)
        if offset >= end:
            return b""
        if self._buf_start <= offset and end <= self._buf_start + len(self._buf):
            data = self._buf[offset - self._buf_start:end - self._buf_start]
        else:
            sequential = offset == self._next_offset and offset > 0
            self._window = min(self._window * 2, self._max_window) if sequential else MIN_WINDOW
            fetch_end = min(max(end, offset + (self._window if sequential else 0)), self._info.size)
            fetched = await self._store.get_range(self._info.path, offset, fetch_end, self._info.etag)
            self._buf_start, self._buf = offset, fetched
            data = fetched[:end - offset]
        self._next_offset = end
        return data
