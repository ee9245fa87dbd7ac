"""Persistent secrets of the local Minerva, kept in its state directory.

API keys, the S3 admin keys and the STS signing key are generated once, at the first start,
and reused afterwards: a user's `--api-key-file` and any data written with the admin keys stay
valid across restarts. Every file written here is private (mode 0600) and replaced atomically,
so a reader never sees a half-written file.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

SECRETS_FILE = "secrets.json"


@dataclass(frozen=True)
class Org:
    """An organisation: its name (the STS session name) and its storage prefix."""

    name: str
    prefix: str


#: The organisations the local Minerva knows; the first is the default (local.json api_key).
ORGS = (Org("acme", "acme/"), Org("globex", "globex/"))

#: Name under which the key that is known but not entitled to storage is stored.
FORBIDDEN = "forbidden"


@dataclass(frozen=True, repr=False)  # no repr: nothing secret may reach a log by accident
class LocalSecrets:
    """Everything secret the local Minerva needs; never logged or printed."""

    admin_access_key: str
    admin_secret_key: str
    signing_key: str  # base64 of 32 random bytes, signs STS session tokens
    api_keys: dict[str, str]  # org name (or FORBIDDEN) -> API key


def make_state_dir(state_dir: Path) -> None:
    """Create the state directory private to the user (an existing one is left as it is)."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (temp file + rename) with mode 0600."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _new_api_key() -> str:
    return "mk_local_" + secrets.token_urlsafe(24)


def load_or_create_secrets(state_dir: Path) -> LocalSecrets:
    """Load the secrets from the state directory, generating whatever is missing."""
    path = state_dir / SECRETS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        data = {}
    before = json.dumps(data, sort_keys=True)

    admin = data.setdefault("admin", {})
    admin.setdefault("access_key", "AKLOCAL" + secrets.token_hex(7).upper())
    admin.setdefault("secret_key", secrets.token_urlsafe(30))
    data.setdefault("signing_key", base64.b64encode(secrets.token_bytes(32)).decode("ascii"))
    api_keys = data.setdefault("api_keys", {})
    for name in [org.name for org in ORGS] + [FORBIDDEN]:
        api_keys.setdefault(name, _new_api_key())

    if json.dumps(data, sort_keys=True) != before:
        write_private(path, json.dumps(data, indent=2) + "\n")
    return LocalSecrets(
        admin_access_key=admin["access_key"],
        admin_secret_key=admin["secret_key"],
        signing_key=data["signing_key"],
        api_keys=dict(api_keys),
    )
