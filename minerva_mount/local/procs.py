"""Polling and stopping child processes: shared by the tests and bench/, which both start
the local Minerva and mounts as subprocesses and must wait on them without fixed sleeps."""

import signal
import subprocess
import time


def wait_for(predicate, what: str, timeout: float = 60.0, interval: float = 0.05):
    """Poll `predicate` until it returns something truthy; TimeoutError naming `what` after `timeout`."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def process_gone(pid: int) -> bool:
    """Whether `pid` has exited (gone, or a zombie its parent has not reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] == "Z"
    except OSError:
        return True
