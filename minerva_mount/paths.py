"""Where things live, following the XDG base directory spec (plain env logic, no dependency).

The control socket sits in the user's runtime dir ($XDG_RUNTIME_DIR, which only the user can
enter); without one, in a 0700 folder under /tmp that must belong to the user, so no other
user can plant a socket there or connect to ours.
"""

import hashlib
import os
import stat
import tempfile
from pathlib import Path

APP = "minerva-mount"


def _base(var: str, fallback: str) -> Path:
    value = os.environ.get(var, "")
    return Path(value) if os.path.isabs(value) else Path(os.path.expanduser(fallback))


def config_dir() -> Path:
    return _base("XDG_CONFIG_HOME", "~/.config") / APP


def config_file() -> Path:
    return config_dir() / "config.toml"


def state_dir() -> Path:
    return _base("XDG_STATE_HOME", "~/.local/state") / APP


def default_log_file() -> Path:
    return state_dir() / f"{APP}.log"


def default_key_file() -> Path:
    return config_dir() / "api-key"


def systemd_user_dir() -> Path:
    return _base("XDG_CONFIG_HOME", "~/.config") / "systemd" / "user"


class UnsafeRuntimeDir(Exception):
    """The fallback runtime folder exists but belongs to someone else or is open to others."""


def runtime_dir(create: bool = True) -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime) and os.path.isdir(runtime):
        path = Path(runtime) / APP
    else:
        path = Path(tempfile.gettempdir()) / f"{APP}-{os.getuid()}"
    if create:
        path.mkdir(mode=0o700, exist_ok=True)
    if path.exists():
        info = path.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise UnsafeRuntimeDir(f"{path} must be a folder of yours with mode 700")
    return path


def control_socket(mountpoint: str, create: bool = True) -> Path:
    """One socket per mount point, named by a hash so the path stays under the 108-byte limit."""
    digest = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:16]
    return runtime_dir(create) / f"control-{digest}.sock"
