"""The control socket: `status` and `unmount` ask the running daemon over a Unix socket.

One socket per mount point in the user's runtime dir (paths.control_socket), mode 0600 in a
0700 folder, and the peer's uid checked as well. The protocol is one JSON object per line each
way: {"op": "status"} -> {"ok": true, "status": {...}}. The daemon side is a trio task in the
daemon's nursery; a request is answered from memory (report.snapshot), so it never blocks the
loop, and a slow or silent client is dropped after a few seconds.
"""

import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import trio

log = logging.getLogger("minerva.control")

MAX_REQUEST = 64 << 10
CLIENT_TIMEOUT = 5.0


class ControlError(Exception):
    """No daemon answers on the socket, or it answered with an error."""


def _peer_uid(sock) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


async def serve(path: Path, handlers: dict[str, Callable[[dict], dict]],
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Listen on `path` until cancelled; `handlers` map an op name to a synchronous function."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # left by a daemon that died; this mount point is not mounted
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    os.chmod(path, 0o600)
    identity = os.stat(path).st_ino
    sock.listen(16)
    listener = trio.SocketListener(sock)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started(path)
            while True:
                stream = await listener.accept()
                nursery.start_soon(_answer, stream, handlers)
    finally:
        with trio.CancelScope(shield=True):
            await listener.aclose()
        try:
            if os.stat(path).st_ino == identity:
                os.unlink(path)
        except OSError:
            pass


async def _answer(stream: trio.SocketStream, handlers: dict[str, Callable[[dict], dict]]) -> None:
    async with stream:
        reply: dict
        try:
            if _peer_uid(stream.socket) not in (os.getuid(), 0):
                log.warning("control socket: refused a client of another user")
                return
            with trio.move_on_after(CLIENT_TIMEOUT):
                data = b""
                while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
                    chunk = await stream.receive_some(MAX_REQUEST)
                    if not chunk:
                        break
                    data += chunk
                try:
                    request = json.loads(data)
                    handler = handlers[request["op"]]
                except (ValueError, KeyError, TypeError):
                    reply = {"ok": False, "error": f"bad request; ops: {', '.join(handlers)}"}
                else:
                    reply = {"ok": True, **handler(request)}
                await stream.send_all(json.dumps(reply, default=str).encode() + b"\n")
        except trio.BrokenResourceError:
            pass
        except Exception:  # a bug here must not take the mount down
            log.exception("control request failed")


def request(path: Path, op: str, timeout: float = CLIENT_TIMEOUT, **fields) -> dict:
    """Blocking client: send one request, return the reply (raises ControlError)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps({"op": op, **fields}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
    except (FileNotFoundError, ConnectionRefusedError):
        raise ControlError("not running") from None
    except OSError as exc:
        raise ControlError(f"control socket {path}: {exc.strerror or exc}") from None
    try:
        reply = json.loads(data)
    except ValueError:
        raise ControlError(f"control socket {path}: no valid answer") from None
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "the daemon refused the request"))
    return reply
