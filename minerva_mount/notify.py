"""sd_notify without a dependency: one datagram to $NOTIFY_SOCKET per state change.

systemd (Type=notify) waits for READY=1 before it calls the unit started, shows the last
STATUS= line in `systemctl status`, and knows from STOPPING=1 that a stop is under way. Outside
systemd NOTIFY_SOCKET is unset and every call does nothing. Sending never blocks: a datagram
socket with MSG_DONTWAIT, and a failure only logged, since the mount matters more.
"""

import logging
import os
import socket

log = logging.getLogger("minerva.notify")


def notify(*fields: str) -> bool:
    """Send `fields` ("READY=1", "STATUS=...") as one message; True when it was sent."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    message = "\n".join(field.replace("\n", " ") for field in fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, socket.MSG_DONTWAIT, address)
    except OSError as exc:
        log.warning("could not notify systemd at %s: %s", address, exc.strerror or exc)
        return False
    return True


def ready(status: str) -> bool:
    return notify("READY=1", f"STATUS={status}")


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def stopping(text: str) -> bool:
    return notify("STOPPING=1", f"STATUS={text}")
