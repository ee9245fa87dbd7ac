"""`minerva-mount install-service [MOUNTPOINT]`: the systemd user unit, written and started.

The unit runs the daemon in the foreground as Type=notify (READY=1 once the mount is live,
STATUS= lines with upload counts), stops it through `minerva-mount unmount` so uploads in
flight finish, and hands it the API key as a systemd credential, so the key is in no unit
file, environment or command line. systemd/minerva-mount.service in the repository is this
same text for a `pip install --user` (tests keep the two identical).
"""

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from .. import paths
from ..config import CREDENTIAL_NAME

UNIT_NAME = "minerva-mount.service"
STOP_TIMEOUT_MIN = 30  # systemd's patience at stop; the daemon's own drain (stop_timeout) is shorter


def _systemd_path(path: str, home: str) -> str:
    """A path for a unit file: %h for the home folder, % escaped, quoted when it has spaces."""
    path = path.replace("%", "%%")
    if home and (path == home or path.startswith(home.rstrip("/") + "/")):
        path = "%h" + path[len(home.rstrip("/")):]
    return f'"{path}"' if any(c.isspace() for c in path) else path


def unit_text(command: str, mountpoint: str) -> str:
    return f"""\
# minerva-mount as a systemd user service; `minerva-mount install-service` writes it to
# ~/.config/systemd/user/ with the paths of your installation. The API key is read from
# ~/.config/minerva-mount/api-key (mode 600) and handed over as a systemd credential.
[Unit]
Description=Minerva storage area at {mountpoint}

[Service]
Type=notify
NotifyAccess=main
ExecStartPre=-/bin/mkdir -p {mountpoint}
ExecStart={command} --foreground {mountpoint}
ExecStop={command} unmount {mountpoint}
Restart=on-failure
RestartSec=10s
RestartPreventExitStatus=78
TimeoutStartSec=120s
TimeoutStopSec={STOP_TIMEOUT_MIN}min
LoadCredential={CREDENTIAL_NAME}:%E/minerva-mount/api-key

[Install]
WantedBy=default.target
"""


def own_command() -> str:
    """How the unit should start this very installation of minerva-mount."""
    script = Path(sys.executable).parent / "minerva-mount"
    if script.exists() and os.access(script, os.X_OK):
        return str(script)
    return f"{sys.executable} -m minerva_mount"


def systemd_user_reachable() -> bool:
    if shutil.which("systemctl") is None:
        return False
    try:
        result = subprocess.run(["systemctl", "--user", "show-environment"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def install_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="minerva-mount install-service",
                                description="Write the systemd user unit, then enable and start it.")
    p.add_argument("mountpoint", nargs="?", default="~/minerva", help="where to mount (default ~/minerva)")
    p.add_argument("--no-start", action="store_true", help="only write the unit file")
    args = p.parse_args(argv)
    home = os.path.expanduser("~")
    mountpoint = os.path.abspath(os.path.expanduser(args.mountpoint))
    command = " ".join(_systemd_path(part, home) if part.startswith("/") else shlex.quote(part)
                       for part in own_command().split(" "))
    unit_dir = paths.systemd_user_dir()
    unit_dir.mkdir(parents=True, exist_ok=True)
    unit = unit_dir / UNIT_NAME
    unit.write_text(unit_text(command, _systemd_path(mountpoint, home)))
    print(f"wrote {unit}")
    key_file = paths.default_key_file()
    steps = ["systemctl --user daemon-reload", f"systemctl --user enable --now {UNIT_NAME}"]
    if not key_file.exists():
        print(f"\nThe service reads your API key from {key_file}. Create it first:\n"
              f"  mkdir -p {key_file.parent} && install -m 600 /dev/stdin {key_file} <<< 'YOUR-API-KEY'\n"
              "then run:\n  " + "\n  ".join(steps))
        return 0
    if args.no_start or not systemd_user_reachable():
        why = "" if args.no_start else " (no systemd user manager answers here)"
        print(f"\nTo start it{why}, run:\n  " + "\n  ".join(steps)
              + "\nTo keep it running while you are logged out: loginctl enable-linger")
        return 0
    for step in steps:
        result = subprocess.run(step.split(), capture_output=True, text=True)
        if result.returncode != 0:
            print(f"minerva-mount: {step} failed: {result.stderr.strip()}", file=sys.stderr)
            return 1
    print(f"started: {mountpoint} is mounted; see 'systemctl --user status {UNIT_NAME}' and "
          f"'minerva-mount status'")
    return 0
