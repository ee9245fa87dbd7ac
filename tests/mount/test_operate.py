"""Operating the mount: systemd notifications and credentials, status, unmount, logs, the unit.

Each test runs a real mount against the local Minerva and uses the commands as a user (or
systemd) does: `minerva-mount status`, `minerva-mount unmount`, `mount -t fuse`, and the
unit file checked by `systemd-analyze verify`.
"""

import http.server
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import stop_process, wait_for

from minerva_mount.commands.service import unit_text
from minerva_mount.commands.status import human_bytes
from minerva_mount.multipart import part_size

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).parent / "minerva-mount"


def cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**(os.environ if env is None else env), "COLUMNS": "160"}  # rich tables: no wrapping
    return subprocess.run([sys.executable, "-m", "minerva_mount", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def status_json(mountpoint: Path, env: dict | None = None) -> dict:
    result = cli("status", str(mountpoint), "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


class NotifyListener:
    """What systemd would receive on $NOTIFY_SOCKET, one datagram per message."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    def poll(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return self.messages
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def wait(self, predicate, what: str) -> dict[str, str]:
        return wait_for(lambda: next((m for m in self.poll() if predicate(m)), None), what)

    def close(self) -> None:
        self.sock.close()


def test_service_run_notifies_systemd_takes_key_from_credentials_and_stops_via_unmount(
        local_minerva, runtime_dir, tmp_path):
    """As the unit runs it: Type=notify, LoadCredential, config file, journald, ExecStop=unmount."""
    local_minerva.wipe()
    mountpoint, creds, xdg = tmp_path / "minerva", tmp_path / "creds", tmp_path / "xdg"
    mountpoint.mkdir()
    creds.mkdir()
    (creds / "minerva-api-key").write_text(local_minerva.info["api_key"])
    (creds / "minerva-api-key").chmod(0o400)
    (xdg / "minerva-mount").mkdir(parents=True)
    (xdg / "minerva-mount" / "config.toml").write_text(
        f'api_url = "{local_minerva.api_url}"\ns3_endpoint_url = "{local_minerva.info["s3_endpoint"]}"\n')
    listener = NotifyListener(Path(tempfile.mkdtemp(prefix="mm-notify-")) / "notify")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MINERVA_", "AWS_")) and k != "NOTIFY_SOCKET"}
    env |= {"NOTIFY_SOCKET": str(listener.path), "CREDENTIALS_DIRECTORY": str(creds),
            "XDG_CONFIG_HOME": str(xdg), "JOURNAL_STREAM": "8:12345"}
    with open(tmp_path / "journal.txt", "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "minerva_mount", "--foreground", str(mountpoint)],
                                env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        ready = listener.wait(lambda m: m.get("READY") == "1", "READY=1")
        assert os.path.ismount(mountpoint), "READY=1 came before the mount was live"
        assert ready["STATUS"].startswith(f"mounted at {mountpoint}")
        (mountpoint / "Incoming" / "hello.txt").write_bytes(b"hello")
        listener.wait(lambda m: "1 done" in m.get("STATUS", ""), "a STATUS line counting the upload")
        assert local_minerva.get("Incoming/hello.txt") == b"hello"

        stop = cli("unmount", str(mountpoint), env=env)  # the unit's ExecStop
        assert stop.returncode == 0, stop.stderr
        assert f"unmounted {mountpoint}" in stop.stdout
        listener.wait(lambda m: m.get("STOPPING") == "1", "STOPPING=1")
        assert proc.wait(30) == 0
        assert not os.path.ismount(mountpoint)
        assert not list((runtime_dir / "minerva-mount").glob("*.sock")), "control socket left behind"
    finally:
        stop_process(proc)
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
        listener.close()
        shutil.rmtree(listener.path.parent, ignore_errors=True)
    journal = (tmp_path / "journal.txt").read_text()
    assert "INFO minerva.daemon: mounted minerva-local/acme/ at" in journal
    for line in journal.splitlines():  # journald adds the time: lines start with the level
        assert re.match(r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: \S", line), line
    assert local_minerva.info["api_key"] not in journal


# Writes a file and keeps it open until told to close it. A separate process, because a
# process that holds a file open for writing must not fork+exec (status, unmount): the child's
# close-on-exec of the inherited descriptor is a close (FUSE flush), which publishes the file.
WRITER = """
import sys
f = open(sys.argv[1], "wb", buffering=0)
f.write(open(sys.argv[2], "rb").read())
print("written", flush=True)
sys.stdin.readline()
f.close()
print("closed", flush=True)
"""


class OpenWriter:
    def __init__(self, target: Path, data: bytes, scratch: Path):
        (scratch / "writer.src").write_bytes(data)
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(scratch / "writer.src")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "written"

    def close(self) -> None:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "closed"
        assert self.proc.wait(60) == 0

    def stop(self) -> None:
        stop_process(self.proc)


def test_status_shows_upload_in_flight_failures_credentials_and_requests(
        local_minerva, runtime_dir, mount_factory, tmp_path):
    local_minerva.wipe()
    mount = mount_factory()
    data = os.urandom(20 * MiB)
    parts, sent = 0, 0  # the whole parts that go up while the file stays open (2 of 8 MiB)
    while sent + part_size(parts + 1) <= len(data):
        parts, sent = parts + 1, sent + part_size(parts + 1)
    writer = OpenWriter(mount.path / "Incoming" / "big.bin", data, tmp_path)
    try:
        def parts_sent():
            report = status_json(mount.path)
            return report["uploads"] and report["uploads"][0]["uploaded"] == sent and report
        report = wait_for(parts_sent, "whole parts uploaded while the file is open")
        upload = report["uploads"][0]
        assert upload["path"] == "Incoming/big.bin" and upload["written"] == 20 * MiB
        assert upload["total"] is None and upload["closing"] is False and upload["rate"] > 0
        assert report["requests"]["upload_part"] == parts
        [sock] = (runtime_dir / "minerva-mount").glob("control-*.sock")
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700

        with pytest.raises(PermissionError), open(mount.path / "Outgoing" / "nope.txt", "wb"):
            pass
        shown = cli("status")  # no mount point given: the one running
        assert shown.returncode == 0, shown.stderr
        assert f"minerva-mount at {mount.path}" in shown.stdout
        assert "Uploads in flight: 1" in shown.stdout and "Incoming/big.bin" in shown.stdout
        assert re.search(rf"Incoming/big.bin .* {human_bytes(sent)} .* 20.0 MiB .* writing", shown.stdout), \
            shown.stdout
        assert "refused create of Outgoing/nope.txt" in shown.stdout
        assert "Credentials: expire" in shown.stdout and f"upload_part {parts}" in shown.stdout
        writer.close()
    finally:
        writer.stop()
    report = status_json(mount.path)
    assert report["uploads"] == [] and report["uploads_completed"] == 1
    assert report["requests"]["upload_part"] == parts + (sent < len(data))
    assert report["requests"]["complete_multipart"] == 1
    assert report["credentials"]["seconds_left"] > 0 and report["credentials"]["expires"]
    assert any("refused create of Outgoing/nope.txt" in f["message"] and f["level"] == "WARNING"
               for f in report["recent_failures"])
    assert report["area"] == f"s3://{local_minerva.bucket}/{local_minerva.prefix}"
    assert local_minerva.get("Incoming/big.bin") == data
    assert mount.unmount() == 0


def test_status_says_when_nothing_is_mounted(runtime_dir, tmp_path):
    result = cli("status", str(tmp_path))
    assert result.returncode == 1 and f"nothing is mounted at {tmp_path} by minerva-mount" in result.stderr
    result = cli("status")
    assert result.returncode == 1 and "no minerva-mount of yours is running" in result.stderr


def test_unmount_waits_for_the_upload_in_flight_then_unmounts(local_minerva, runtime_dir, mount_factory,
                                                              tmp_path):
    local_minerva.wipe()
    mount = mount_factory()
    data = os.urandom(10 * MiB)
    out = tmp_path / "unmount.out"
    writer = OpenWriter(mount.path / "Incoming" / "late.bin", data, tmp_path)
    with open(out, "w") as output:
        unmount = subprocess.Popen([sys.executable, "-m", "minerva_mount", "unmount", str(mount.path)],
                                   stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "waiting for 1 uploads: Incoming/late.bin" in out.read_text(),
                 "unmount to report the upload it waits for")
        assert unmount.poll() is None and os.path.ismount(mount.path)
        writer.close()
        assert unmount.wait(60) == 0, out.read_text()
    finally:
        writer.stop()
        stop_process(unmount)
    assert f"unmounted {mount.path}" in out.read_text()
    assert mount.proc.wait(30) == 0
    assert not os.path.ismount(mount.path)
    assert local_minerva.get("Incoming/late.bin") == data


class CredentialProxy(http.server.BaseHTTPRequestHandler):
    """Passes POST /storage/boto to the local Minerva and keeps every answer (the secrets)."""

    upstream = ""
    answers: list[bytes] = []

    def do_POST(self):
        request = urllib.request.Request(self.upstream + self.path, data=b"", method="POST",
                                         headers={"x-api-key": self.headers.get("x-api-key", "")})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read()
        self.answers.append(body)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_verbose_log_has_one_line_per_request_and_no_secret(local_minerva, mount_factory, tmp_path):
    local_minerva.wipe()
    CredentialProxy.upstream, CredentialProxy.answers = local_minerva.api_url, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CredentialProxy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        mount = mount_factory(extra=("-v", "--api-url", f"http://127.0.0.1:{server.server_port}"))
        data = os.urandom(12 * MiB)
        (tmp_path / "src.bin").write_bytes(data)
        subprocess.run(["cp", str(tmp_path / "src.bin"), str(mount.path / "Incoming" / "v.bin")], check=True)
        assert (mount.path / "Incoming" / "v.bin").read_bytes() == data
        assert mount.unmount() == 0
    finally:
        server.shutdown()
        server.server_close()
    log = mount.log()
    assert "DEBUG minerva.store: request upload_part Incoming/v.bin" in log
    assert "DEBUG minerva.store: request get Incoming/v.bin" in log
    assert "INFO minerva.core: uploaded Incoming/v.bin (12582912 bytes)" in log
    for line in log.splitlines():
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ",
                        line), line
    assert CredentialProxy.answers, "the mount did not fetch credentials through the proxy"
    secrets = {local_minerva.info["api_key"]}
    for body in CredentialProxy.answers:
        creds = json.loads(body)["credentials"]
        secrets |= {creds["aws_secret_access_key"], creds["aws_session_token"]}
    for secret in secrets:
        assert secret not in log


def _verify(unit: Path, home: Path) -> subprocess.CompletedProcess:
    run = Path(tempfile.mkdtemp(prefix="mm-sd-"))
    try:
        env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(run)}
        env.pop("XDG_CONFIG_HOME", None)
        return subprocess.run(["systemd-analyze", "--user", "verify", str(unit)], capture_output=True,
                              text=True, env=env, timeout=60)
    finally:
        shutil.rmtree(run, ignore_errors=True)


def test_shipped_unit_is_the_generated_one_and_verifies(tmp_path):
    shipped = REPO / "systemd" / "minerva-mount.service"
    assert shipped.read_text() == unit_text("%h/.local/bin/minerva-mount", "%h/minerva")
    text = shipped.read_text()
    for line in ("Type=notify", "ExecStart=%h/.local/bin/minerva-mount --foreground %h/minerva",
                 "ExecStop=%h/.local/bin/minerva-mount unmount %h/minerva", "Restart=on-failure",
                 "TimeoutStopSec=30min", "LoadCredential=minerva-api-key:%E/minerva-mount/api-key"):
        assert line in text.splitlines()
    (tmp_path / ".local" / "bin").mkdir(parents=True)
    (tmp_path / ".local" / "bin" / "minerva-mount").symlink_to(SCRIPT)
    result = _verify(shipped, tmp_path)
    assert result.returncode == 0 and result.stderr.strip() == "" and result.stdout.strip() == "", \
        result.stdout + result.stderr


def test_install_service_writes_the_unit_and_says_what_to_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")} | {"HOME": str(tmp_path)}
    first = cli("install-service", env=env)
    unit = tmp_path / ".config" / "systemd" / "user" / "minerva-mount.service"
    assert first.returncode == 0, first.stderr
    assert f"wrote {unit}" in first.stdout and "Create it first" in first.stdout
    key = tmp_path / ".config" / "minerva-mount" / "api-key"
    key.parent.mkdir(parents=True)
    key.write_text("mk_test")
    key.chmod(0o600)
    second = cli("install-service", "~/data/minerva", env=env)
    assert second.returncode == 0, second.stderr
    assert "no systemd user manager answers here" in second.stdout
    assert "systemctl --user enable --now minerva-mount.service" in second.stdout
    text = unit.read_text()
    assert f"ExecStart={SCRIPT} --foreground %h/data/minerva" in text
    assert f"ExecStop={SCRIPT} unmount %h/data/minerva" in text
    result = _verify(unit, tmp_path)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def test_fstab_style_mount_with_o_options(local_minerva, runtime_dir, tmp_path):
    """What an fstab line does: mount(8) -> mount.fuse3 -> minerva-mount SOURCE DIR -o OPTIONS."""
    local_minerva.wipe()
    mountpoint = tmp_path / "fstab"
    mountpoint.mkdir()
    key = local_minerva.key_file(local_minerva.info["api_key"], "fstab")
    options = (f"api_url={local_minerva.api_url},s3_endpoint_url={local_minerva.info['s3_endpoint']},"
               f"api_key_file={key},log_file={tmp_path / 'fstab.log'},nodev,nosuid,noauto,_netdev,"
               "x-systemd.automount")
    result = subprocess.run(["mount", "-t", "fuse", f"{SCRIPT}#minerva", str(mountpoint), "-o", options],
                            capture_output=True, text=True, timeout=60)
    pid = None
    try:
        assert result.returncode == 0, result.stderr
        assert os.path.ismount(mountpoint)
        pid = status_json(mountpoint)["pid"]
        (mountpoint / "Incoming" / "f.txt").write_bytes(b"via fstab")
        assert local_minerva.get("Incoming/f.txt") == b"via fstab"
        done = cli("unmount", str(mountpoint))
        assert done.returncode == 0, done.stderr
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
        if pid is not None and os.path.exists(f"/proc/{pid}"):
            wait_for(lambda: not os.path.exists(f"/proc/{pid}") or _gone(pid), "the daemon to exit")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    except OSError:
        return True


def test_sigterm_sends_stopping(local_minerva, runtime_dir, mount_factory, monkeypatch):
    listener = NotifyListener(Path(tempfile.mkdtemp(prefix="mm-notify-")) / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(listener.path))
    try:
        mount = mount_factory()
        listener.wait(lambda m: m.get("READY") == "1", "READY=1")
        mount.proc.send_signal(signal.SIGTERM)
        listener.wait(lambda m: m.get("STOPPING") == "1", "STOPPING=1")
        assert mount.proc.wait(30) == 0
    finally:
        listener.close()
        shutil.rmtree(listener.path.parent, ignore_errors=True)


def test_dead_mount_is_named_by_status_and_cleared_by_unmount(local_minerva, runtime_dir, mount_factory):
    mount = mount_factory()
    mount.proc.kill()  # a crash: the kernel keeps a mount nobody serves
    mount.proc.wait(30)
    result = cli("status", str(mount.path))
    assert result.returncode == 1 and f"{mount.path} is a dead mount" in result.stderr
    result = cli("unmount", str(mount.path))
    assert result.returncode == 0, result.stderr
    assert not os.path.ismount(mount.path) and os.listdir(mount.path) == []
    result = cli("status", str(mount.path))
    assert result.returncode == 1 and f"nothing is mounted at {mount.path}" in result.stderr
