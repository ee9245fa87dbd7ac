"""The local Minerva's credential endpoint: `POST /storage/boto`, as the real service answers it.

Bodies, status codes and field names follow reference/minerva-storage-boto.md exactly, so a
client tested here behaves the same against https://api.minerva.io. Each call mints fresh
credentials (the real service does too); nothing secret is ever logged: the access log holds
method, path and status only.

Fault injection, for tests of the client's error handling. The server binds 127.0.0.1 only and
these routes also refuse non-loopback peers:

- `POST /_local/fault` with body `{"mode": M}` sets how `/storage/boto` answers from then on,
  for every key (valid, unknown or missing):
  `"ok"` normal behaviour; `"500"`, `"401"`, `"403"` that error with its documented body;
  `"malformed"` a 200 whose `credentials` lacks `aws_session_token` (nothing is minted; the
  bucket_info is the key's org, or the first org for an unknown key);
  `"hang"` no answer until the mode changes (then answers per the new mode) or about 60 s
  have passed (then the connection is closed without an answer).
  Answers 200 `{"mode": M}`, or 400 for an unknown mode.
- `GET /_local/fault` answers 200 `{"mode": M}` with the current mode.
- `POST /_local/s3` with body `{"state": "down"}` stops the S3 server (weed) as an outage
  does: new connections are refused, open ones are cut. `{"state": "up"}` starts it again on
  the same ports with the same data and answers once it serves requests. Answers 200
  `{"state": S}`, 400 for an unknown state, 500 if weed does not come back.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import secrets
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from minerva_mount.local.state import Org

log = logging.getLogger(__name__)

FAULT_MODES = ("ok", "500", "401", "403", "malformed", "hang")
HANG_LIMIT = 60.0  # seconds a "hang" request is held before its connection is dropped
MAX_BODY = 64 * 1024

ERRORS = {
    400: ("bad_request", "Bad Request"),
    401: ("unauthorized", "Unauthorized"),
    403: ("forbidden", "Forbidden"),
    404: ("not_found", "Not Found"),
    405: ("method_not_allowed", "Method Not Allowed"),
    500: (
        "internal_error",
        "An unknown error occurred, please contact help@minerva.io if problem persists",
    ),
}

ROUTES = {"/storage/boto": ("POST",), "/_local/fault": ("GET", "POST"), "/_local/s3": ("POST",)}
S3_STATES = ("down", "up")


class FaultState:
    """The injected fault mode, shared by all request threads; "hang" waiters wake on change."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._mode = "ok"
        self._closing = False

    @property
    def mode(self) -> str:
        with self._cond:
            return self._mode

    def set(self, mode: str) -> None:
        with self._cond:
            self._mode = mode
            self._cond.notify_all()

    def wait_out_hang(self, limit: float) -> str | None:
        """The mode to answer with: waits while it is "hang"; None if still hanging."""
        with self._cond:
            self._cond.wait_for(lambda: self._mode != "hang" or self._closing, timeout=limit)
            return None if self._mode == "hang" else self._mode

    def close(self) -> None:
        """Release every hanging request (server shutdown)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()


@dataclass
class Endpoint:
    """What the handler needs: keys, orgs, the bucket, and how to mint credentials."""

    orgs_by_key: dict[str, Org]
    forbidden_keys: frozenset[str]
    bucket: str
    region: str
    credential_lifetime: int
    mint: Callable[[Org], dict[str, Any]]  # boto3 STS "Credentials" dict
    fault: FaultState
    s3_control: Callable[[str], None] | None = None  # "down" / "up": stop or restart weed

    def classify(self, api_key: str | None) -> Org | int:
        """The key's org, or 401 (missing/unknown) or 403 (known, not entitled)."""
        if not api_key:
            return 401
        given = api_key.encode()
        found: Org | int = 401
        for key, org in self.orgs_by_key.items():  # compare every key: no timing shortcut
            if hmac.compare_digest(key.encode(), given):
                found = org
        for key in self.forbidden_keys:
            if hmac.compare_digest(key.encode(), given):
                found = 403
        return found

    def success_body(self, org: Org, creds: dict[str, Any]) -> dict[str, Any]:
        expiration = creds["Expiration"]
        if isinstance(expiration, str):  # boto3 parses it; be lenient all the same
            expiration = datetime.fromisoformat(expiration.replace("Z", "+00:00"))
        return {
            "credentials": {
                "aws_region": self.region,
                "aws_key_id": creds["AccessKeyId"],
                "aws_secret_access_key": creds["SecretAccessKey"],
                "aws_session_token": creds["SessionToken"],
                "aws_session_expiration": expiration.astimezone(UTC).isoformat(timespec="seconds"),
            },
            "bucket_info": {
                "name": self.bucket,
                "prefix": org.prefix,
                "uri": f"s3://{self.bucket}/{org.prefix}",
            },
        }

    def malformed_body(self, org: Org) -> dict[str, Any]:
        """A 200 body missing aws_session_token (useless keys, nothing minted)."""
        fake = {
            "AccessKeyId": "ASIA" + secrets.token_hex(8).upper(),
            "SecretAccessKey": secrets.token_urlsafe(30),
            "SessionToken": "",
            "Expiration": datetime.now(UTC) + timedelta(seconds=self.credential_lifetime),
        }
        body = self.success_body(org, fake)
        del body["credentials"]["aws_session_token"]
        return body


def error_body(status: int) -> dict[str, str]:
    code, message = ERRORS[status]
    return {"code": code, "message": message, "api_request_id": str(uuid.uuid4())}


class Handler(BaseHTTPRequestHandler):
    server: EndpointServer

    def version_string(self) -> str:
        return "minerva-local"

    # -- routing ------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()

    def do_PUT(self) -> None:
        self._route()

    def do_DELETE(self) -> None:
        self._route()

    def do_PATCH(self) -> None:
        self._route()

    def do_HEAD(self) -> None:
        self._route()

    def do_OPTIONS(self) -> None:
        self._route()

    def _route(self) -> None:
        path = self.path.split("?", 1)[0]
        body = self._read_body()
        if body is None:
            return
        methods = ROUTES.get(path)
        if methods is None:
            self._send_json(404, error_body(404))
        elif self.command not in methods:
            self._send_json(405, error_body(405), {"Allow": ", ".join(methods)})
        elif path == "/storage/boto":
            self._storage_boto()
        elif not ipaddress.ip_address(self.client_address[0]).is_loopback:
            self._send_json(403, error_body(403))
        elif self.command == "GET":
            self._send_json(200, {"mode": self.server.endpoint.fault.mode})
        elif path == "/_local/s3":
            self._set_s3(body)
        else:
            self._set_fault(body)

    def _read_body(self) -> bytes | None:
        """Read the request body (so the connection closes cleanly); None if refused."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY:
            self._send_json(400, error_body(400))
            return None
        return self.rfile.read(length) if length else b""

    # -- handlers -----------------------------------------------------------------------

    def _storage_boto(self) -> None:
        endpoint = self.server.endpoint
        mode = endpoint.fault.mode
        if mode == "hang":
            mode = endpoint.fault.wait_out_hang(HANG_LIMIT)
            if mode is None:
                self.close_connection = True
                self.log_request("-")
                return
        if mode in ("500", "401", "403"):
            self._send_json(int(mode), error_body(int(mode)))
            return
        found = endpoint.classify(self.headers.get("x-api-key"))
        if mode == "malformed":
            org = found if isinstance(found, Org) else next(iter(endpoint.orgs_by_key.values()))
            self._send_json(200, endpoint.malformed_body(org))
            return
        if isinstance(found, int):
            self._send_json(found, error_body(found))
            return
        try:
            creds = endpoint.mint(found)
        except Exception as e:  # AssumeRole failed: the service answers 500
            log.warning("AssumeRole for org %s failed: %s", found.name, type(e).__name__)
            self._send_json(500, error_body(500))
            return
        self._send_json(200, endpoint.success_body(found, creds))

    def _set_fault(self, body: bytes) -> None:
        try:
            mode = json.loads(body or b"{}").get("mode")
        except (ValueError, AttributeError):
            mode = None
        if mode not in FAULT_MODES:
            self._send_json(400, error_body(400) | {"modes": list(FAULT_MODES)})
            return
        self.server.endpoint.fault.set(mode)
        log.info("fault mode set to %s", mode)
        self._send_json(200, {"mode": mode})

    def _set_s3(self, body: bytes) -> None:
        try:
            state = json.loads(body or b"{}").get("state")
        except (ValueError, AttributeError):
            state = None
        control = self.server.endpoint.s3_control
        if state not in S3_STATES or control is None:
            self._send_json(400, error_body(400) | {"states": list(S3_STATES)})
            return
        try:
            control(state)
        except Exception as e:
            log.warning("S3 %s failed: %s", state, e)
            self._send_json(500, error_body(500))
            return
        log.info("S3 server is %s", state)
        self._send_json(200, {"state": state})

    # -- output -------------------------------------------------------------------------

    def _send_json(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Access log: method, path (no query) and status only, never headers or bodies."""
        log.info("%s %s %s", self.command, self.path.split("?", 1)[0], code)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)


class EndpointServer(ThreadingHTTPServer):
    """ThreadingHTTPServer on 127.0.0.1 carrying the Endpoint for its handlers."""

    daemon_threads = True

    def __init__(self, endpoint: Endpoint, port: int = 0):
        self.endpoint = endpoint
        self._thread: threading.Thread | None = None
        super().__init__(("127.0.0.1", port), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.serve_forever, name="minerva-local-api", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving (if started), release hanging requests, close the socket."""
        self.endpoint.fault.close()
        if self._thread is not None:
            self.shutdown()  # blocks until serve_forever returns: only if it runs
            self._thread = None
        self.server_close()
