"""Short-lived STS credentials from Minerva's `POST /storage/boto`.

One set is kept and refreshed ahead of expiry by a single background task, so requests never
wait on the endpoint and are never signed with expired credentials (the contract asks clients
not to call it per request). Nothing here ever formats a key, secret or token into a message.
"""

import datetime as dt
import json
import logging
import random
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .errors import CredentialError

log = logging.getLogger("minerva.credentials")

_ACCESS = 13  # errno.EACCES, spelled out to keep the import list short


@dataclass(frozen=True)
class Credentials:
    key_id: str = field(repr=False)
    secret: str = field(repr=False)
    token: str = field(repr=False)
    expiration: dt.datetime
    region: str
    bucket: str
    prefix: str

    def seconds_left(self) -> float:
        return (self.expiration - dt.datetime.now(dt.UTC)).total_seconds()


def parse_response(body: bytes) -> Credentials:
    """Validate a 200 body field by field, naming the first thing that is wrong."""
    try:
        doc = json.loads(body)
        creds, info = doc["credentials"], doc["bucket_info"]
        values = {
            name: creds[name]
            for name in ("aws_region", "aws_key_id", "aws_secret_access_key",
                         "aws_session_token", "aws_session_expiration")
        }
        bucket, prefix = info["name"], info["prefix"]
    except (ValueError, TypeError) as exc:
        raise CredentialError(
            f"malformed credential response: not the documented JSON ({type(exc).__name__})") from None
    except KeyError as exc:
        raise CredentialError(f"malformed credential response: missing field {exc.args[0]!r}") from None
    for name, value in [*values.items(), ("bucket_info.name", bucket), ("bucket_info.prefix", prefix)]:
        if not isinstance(value, str) or not value:
            raise CredentialError(f"malformed credential response: field {name!r} is empty or not text")
    try:
        expiration = dt.datetime.fromisoformat(values["aws_session_expiration"].replace("Z", "+00:00"))
    except ValueError:
        raise CredentialError(
            "malformed credential response: aws_session_expiration is not an ISO 8601 date") from None
    if expiration.tzinfo is None:
        expiration = expiration.replace(tzinfo=dt.UTC)
    if expiration <= dt.datetime.now(dt.UTC):
        raise CredentialError("credential response gives an expiry in the past: check this machine's clock")
    if not prefix.endswith("/") or prefix.startswith("/"):
        raise CredentialError(f"malformed credential response: prefix {prefix!r} is not of the form 'org/'")
    uri = info.get("uri")
    if uri is not None and uri != f"s3://{bucket}/{prefix}":
        raise CredentialError("malformed credential response: bucket_info.uri does not match name and prefix")
    return Credentials(
        key_id=values["aws_key_id"], secret=values["aws_secret_access_key"],
        token=values["aws_session_token"], expiration=expiration,
        region=values["aws_region"], bucket=bucket, prefix=prefix,
    )


def fetch(api_url: str, api_key: str, timeout: float = 20.0) -> Credentials:
    """One blocking call to the endpoint; run it in a worker thread."""
    request = urllib.request.Request(
        api_url.rstrip("/") + "/storage/boto", data=b"", method="POST",
        headers={"x-api-key": api_key, "Accept": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return parse_response(response.read())
    except urllib.error.HTTPError as exc:
        code = _error_code(exc)
        if exc.code == 401:
            raise CredentialError(
                f"the Minerva API key was refused (401 {code}): check MINERVA_API_KEY or "
                "--api-key-file", fatal=True, err=_ACCESS) from None
        if exc.code == 403:
            raise CredentialError(
                f"this API key is not entitled to Minerva storage (403 {code}): ask your "
                "Minerva admin to enable storage for it", fatal=True, err=_ACCESS) from None
        raise CredentialError(f"credential endpoint answered {exc.code} {code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CredentialError(f"credential endpoint {api_url} unreachable: {reason}") from None


def _error_code(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read()).get("code", "")) or "no code"
    except Exception:
        return "no code"


def refresh_margin(lifetime: float) -> float:
    """Refresh when this many seconds are left: 5 minutes of an hour, half of a short life."""
    return min(300.0, lifetime / 2)


def usable_margin(lifetime: float) -> float:
    """Below this many seconds left a set is too close to expiry to sign a request with."""
    return min(10.0, lifetime / 5)


class CredentialProvider:
    """Holds the current credentials and refreshes them in the background.

    `start` (via nursery.start) returns once the first set is in hand, or raises a fatal
    CredentialError (bad key, not entitled) or the last error after `startup_timeout`.
    """

    def __init__(self, api_url: str, api_key: str, *, wait_timeout: float = 60.0,
                 startup_timeout: float = 60.0,
                 fetcher: Callable[[str, str], Credentials] = fetch):
        self._api_url = api_url
        self._api_key = api_key
        self._fetcher = fetcher
        self.wait_timeout = wait_timeout
        self.startup_timeout = startup_timeout
        self.current: Credentials | None = None
        self.lifetime = 3600.0
        self.last_error: CredentialError | None = None
        self.refreshes = 0
        self._changed = trio.Event()
        self._limiter = trio.CapacityLimiter(1)

    async def _fetch_once(self) -> Credentials:
        return await trio.to_thread.run_sync(
            self._fetcher, self._api_url, self._api_key, limiter=self._limiter)

    def _install(self, creds: Credentials) -> None:
        self.current = creds
        self.lifetime = max(creds.seconds_left(), 1.0)
        self.last_error = None
        self.refreshes += 1
        self._changed.set()
        self._changed = trio.Event()
        log.info("credentials refreshed: bucket %s prefix %s, %.0f s to expiry",
                 creds.bucket, creds.prefix, creds.seconds_left())

    async def start(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        deadline = trio.current_time() + self.startup_timeout
        delay = 0.5
        while True:
            try:
                self._install(await self._fetch_once())
                break
            except CredentialError as exc:
                if exc.fatal or trio.current_time() + delay > deadline:
                    raise
                log.warning("%s; retrying in %.1f s", exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, 10.0)
        task_status.started(self.current)
        await self._refresh_loop()

    async def _refresh_loop(self) -> None:
        failures = 0
        while True:
            if failures == 0:
                wait = self.current.seconds_left() - refresh_margin(self.lifetime)
                await trio.sleep(max(wait, 0.0))
            try:
                self._install(await self._fetch_once())
                failures = 0
            except CredentialError as exc:
                failures += 1
                if self.last_error is None or str(self.last_error) != str(exc):
                    log.error("credential refresh failed: %s", exc)
                self.last_error = exc
                self._changed.set()
                self._changed = trio.Event()
                # Never wait longer than a quarter of what is left: short-lived sets (and
                # an endpoint coming back) must not be missed by one long backoff.
                left = self.current.seconds_left() if self.current else 0.0
                base = 60.0 if exc.fatal else min(2.0 ** failures, 30.0, max(left / 4, 1.0))
                await trio.sleep(base * random.uniform(0.5, 1.0))

    async def get(self) -> Credentials:
        """Credentials fit to sign a request now, waiting up to `wait_timeout` for a refresh."""
        with trio.move_on_after(self.wait_timeout):
            while True:
                creds = self.current
                if creds is not None and creds.seconds_left() > usable_margin(self.lifetime):
                    return creds
                if self.last_error is not None and self.last_error.fatal:
                    raise self.last_error
                await self._changed.wait()
        cause = self.last_error or "no refresh arrived"
        raise CredentialError(f"no valid Minerva credentials after {self.wait_timeout:.0f} s: {cause}")

