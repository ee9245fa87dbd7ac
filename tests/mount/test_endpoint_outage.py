"""The credential endpoint failing for a minute while the credentials are still valid: no errors.

A local Minerva with `--credential-lifetime 100` refreshes 50 s after each fetch, so a refresh
falls inside the failure window. The endpoint first answers 500 (its fault control), then
refuses connections: the mount reaches it through a gate, a small TCP forwarder on 127.0.0.1
that this test closes (its listening socket goes away: connection refused) and opens again on
the same port.
"""

import contextlib
import dataclasses
import os
import socket
import threading
import time
from urllib.parse import urlparse

import pytest
from helpers import local_minerva_with_lifetime

LIFETIME = 100
FAIL_500_SECONDS, REFUSED_SECONDS = 50.0, 15.0  # the outage phases: the refresh due 50 s after
# the mount falls in the first (lengths of the outage, not timing checks)


class Gate:
    """Forwards 127.0.0.1:port to the endpoint while open; refuses connections while closed."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def open(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.2)
        self._stop.clear()
        self._thread = threading.Thread(target=self._accept, args=(self._listener,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._listener is not None:
            self._listener.close()
        self._listener = self._thread = None

    def _accept(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    for s in (src, dst):
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)


@pytest.fixture(scope="module")
def hundred_second_creds(tmp_path_factory):
    with local_minerva_with_lifetime(tmp_path_factory, LIFETIME) as local:
        yield local


def test_a_minute_of_500s_then_refused_connections_while_credentials_are_valid(
        hundred_second_creds, mount_factory, tmp_path):
    local = hundred_second_creds
    local.wipe()
    gate = Gate(urlparse(local.api_url).port)
    gate.open()
    try:  # the mount reaches the endpoint through the gate; the test controls it directly
        mount = mount_factory(local=dataclasses.replace(local, info=dict(local.info, api_url=gate.url)))
        incoming = mount.path / "Incoming"
        sent: dict[str, bytes] = {}

        def work_for(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                name = f"f-{len(sent)}.bin"
                data = os.urandom(256 << 10)
                (incoming / name).write_bytes(data)
                sent[name] = data
                assert (incoming / name).read_bytes() == data
                assert name in os.listdir(incoming)

        work_for(5.0)
        local.fault("500")
        try:
            work_for(FAIL_500_SECONDS)
            gate.close()
            local.fault("ok")
            work_for(REFUSED_SECONDS)
        finally:
            local.fault("ok")
            if gate._listener is None:
                gate.open()
        work_for(10.0)
    finally:
        gate.close()
    log = mount.log()
    assert "credential refresh failed: credential endpoint answered 500 internal_error" in log
    assert "unreachable: [Errno 111] Connection refused" in log
    assert "no valid Minerva credentials" not in log and " ERROR minerva.fs" not in log
    assert log.count("credentials refreshed") >= 2  # it refreshed once the endpoint was back
    assert sorted(k.split("/", 1)[1] for k in local.keys("Incoming/")) == sorted(sent)
