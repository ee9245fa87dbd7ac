"""Run the local Minerva: weed (S3 + STS) plus the credential endpoint, until SIGINT/SIGTERM.

When both are ready, STATE_DIR/local.json (mode 0600) tells clients and tests where
everything is:

    api_url, api_key (acme's), s3_endpoint, bucket, prefix, region,
    admin {aws_access_key_id, aws_secret_access_key},
    orgs [{api_key, prefix}, ...], forbidden_api_key, credential_lifetime, pid

and STATE_DIR/api-key holds acme's API key for `--api-key-file`. local.json exists only while
the service is up: a stale one is deleted at start and it is removed at shutdown, so a reader
polling for it never connects to a dead server.

Usage: python -m minerva_mount.local.server --state-dir DIR [--credential-lifetime N]
[--api-port N]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fcntl
import json
import logging
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from minerva_mount.local.endpoint import Endpoint, EndpointServer, FaultState
from minerva_mount.local.seaweed import BUCKET, REGION, Seaweed, StartAborted, WeedError
from minerva_mount.local.state import (
    FORBIDDEN,
    ORGS,
    LocalSecrets,
    load_or_create_secrets,
    make_state_dir,
    write_private,
)

LOCAL_JSON = "local.json"
API_KEY_FILE = "api-key"
LOCK_FILE = "lock"


def _say(message: str) -> None:
    print(f"local Minerva: {message}", file=sys.stderr, flush=True)


def _install_stop_handlers(stop: threading.Event) -> Callable[[], None]:
    """SIGINT/SIGTERM set `stop`; returns a function restoring the previous handlers."""
    previous: dict[int, object] = {}

    def handler(signum: int, frame: object) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: the caller handles signals
            break

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)  # type: ignore[arg-type]

    return restore


class _MainThreadCalls:
    """Calls from request threads, run by the main loop.

    weed is started with PR_SET_PDEATHSIG, which fires when the *thread* that started it
    exits: a weed restarted from a short-lived HTTP request thread would be stopped as soon as
    that request is answered. So restarts happen on the main thread, which lives as long as
    the server.
    """

    def __init__(self) -> None:
        self._calls: queue.Queue[tuple[Callable[[], None], concurrent.futures.Future]] = queue.Queue()

    def call(self, fn: Callable[[], None], timeout: float = 120) -> None:
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((fn, done))
        done.result(timeout)

    def run_pending(self, timeout: float) -> None:
        try:
            fn, done = self._calls.get(timeout=timeout)
        except queue.Empty:
            return
        try:
            done.set_result(fn())
        except Exception as e:
            done.set_exception(e)


def _local_json(
    secrets: LocalSecrets, api_url: str, s3_endpoint: str, credential_lifetime: int
) -> dict[str, object]:
    orgs = [{"api_key": secrets.api_keys[org.name], "prefix": org.prefix} for org in ORGS]
    return {
        "api_url": api_url,
        "api_key": orgs[0]["api_key"],
        "s3_endpoint": s3_endpoint,
        "bucket": BUCKET,
        "prefix": orgs[0]["prefix"],
        "region": REGION,
        "admin": {
            "aws_access_key_id": secrets.admin_access_key,
            "aws_secret_access_key": secrets.admin_secret_key,
        },
        "orgs": orgs,
        "forbidden_api_key": secrets.api_keys[FORBIDDEN],
        "credential_lifetime": credential_lifetime,
        "pid": os.getpid(),
    }


def serve(state_dir: Path, credential_lifetime: int = 3600, api_port: int = 0) -> int:
    """Run the local Minerva in the foreground; 0 after SIGINT/SIGTERM, 1 on failure.

    Everything started here (weed, the HTTP server) is stopped before returning.
    """
    if credential_lifetime < 1:
        _say(f"credential lifetime must be at least 1 second, not {credential_lifetime}")
        return 1
    state_dir = Path(state_dir).expanduser().absolute()
    make_state_dir(state_dir)
    # Two servers on one state dir would share weed's data dir: hold a lock while running.
    with open(state_dir / LOCK_FILE, "a+b") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"another local Minerva is already running with state {state_dir}")
            return 1
        return _run(state_dir, credential_lifetime, api_port)


def _run(state_dir: Path, credential_lifetime: int, api_port: int) -> int:
    local_json = state_dir / LOCAL_JSON
    local_json.unlink(missing_ok=True)
    stop = threading.Event()
    restore_signals = _install_stop_handlers(stop)
    weed: Seaweed | None = None
    api: EndpointServer | None = None
    main_thread = _MainThreadCalls()
    try:
        secrets = load_or_create_secrets(state_dir)
        weed = Seaweed(state_dir, secrets, credential_lifetime)
        endpoint = Endpoint(
            orgs_by_key={secrets.api_keys[org.name]: org for org in ORGS},
            forbidden_keys=frozenset({secrets.api_keys[FORBIDDEN]}),
            bucket=BUCKET,
            region=REGION,
            credential_lifetime=credential_lifetime,
            mint=weed.assume_org_role,
            fault=FaultState(),
            s3_control=lambda state: main_thread.call(weed.down if state == "down" else weed.up),
        )
        try:
            api = EndpointServer(endpoint, api_port)  # bind first: a taken port fails fast
        except OSError as e:
            _say(f"cannot listen on 127.0.0.1:{api_port}: {e.strerror}")
            return 1
        try:
            weed.start(should_stop=stop.is_set)
        except StartAborted:
            return 0
        except WeedError as e:
            _say(str(e))
            return 1
        api.start()

        info = _local_json(secrets, api.url, weed.endpoint, credential_lifetime)
        write_private(state_dir / API_KEY_FILE, f"{info['api_key']}\n")
        write_private(local_json, json.dumps(info, indent=2) + "\n")
        print(
            f"local Minerva ready: api {api.url}, s3 {weed.endpoint}, state {state_dir}",
            file=sys.stderr,
            flush=True,
        )

        while not stop.is_set():
            main_thread.run_pending(timeout=0.5)
            code = weed.exited()
            if code is not None:
                _say(f"weed exited unexpectedly with code {code}; see {weed.log_path}")
                return 1
        return 0
    finally:
        local_json.unlink(missing_ok=True)
        if api is not None:
            api.stop()
        if weed is not None:
            weed.stop()
        restore_signals()
        if stop.is_set():
            _say("stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m minerva_mount.local.server",
        description="Run the local Minerva (credential endpoint + SeaweedFS S3) on 127.0.0.1.",
    )
    parser.add_argument("--state-dir", type=Path, required=True, help="keys, data and logs")
    parser.add_argument(
        "--credential-lifetime", type=int, default=3600, help="seconds (default 3600)"
    )
    parser.add_argument("--api-port", type=int, default=0, help="default: a free port")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    logging.getLogger("minerva_mount.local").setLevel(logging.INFO)
    return serve(args.state_dir, args.credential_lifetime, args.api_port)


if __name__ == "__main__":
    sys.exit(main())
