"""Whether the process that opened a file still holds it: tells the last close from a copy's.

The kernel sends FLUSH on every close() of a descriptor, also when a shell's child exits and
closes the copies it inherited (`{ echo a; /bin/true; echo b; } > f`). Publishing at that flush
would send half a file. pyfuse3's flush carries no pid, so the core notes the opening process
at open and asks here, at flush, whether it still has the file open: the kernel removes a
descriptor from /proc/PID/fd before it sends the FLUSH of its close, so the last close of the
opener finds none left.
"""

import os


def process_of(pid: int) -> int | None:
    """The process (thread group) of thread `pid`, or None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def holds_open(pid: int, target: str) -> bool:
    """Whether process `pid` has a descriptor on the file at absolute path `target`."""
    folder = f"/proc/{pid}/fd"
    try:
        descriptors = os.listdir(folder)
    except OSError:
        return False  # gone, or not ours to read: nothing of it can keep writing to the file
    for fd in descriptors:
        try:
            if os.readlink(f"{folder}/{fd}") == target:
                return True
        except OSError:
            continue
    return False
