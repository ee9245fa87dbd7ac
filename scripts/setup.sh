#!/usr/bin/env bash
# Installs what minerva-mount needs on Debian/Ubuntu, only what is missing:
# system packages (FUSE 3, a compiler for pyfuse3) and the project in ./.venv.
# Arguments name more Debian packages to install the same way (bench/setup.sh uses this).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

packages=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv rsync attr libglib2.0-bin vim-tiny "$@")
# systemd-analyze checks the user unit in the tests; containers often lack it.
command -v systemd-analyze >/dev/null || packages+=(systemd)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "setup: minerva-mount needs Python 3.11 or newer ($python is $("$python" --version))" >&2; exit 1; }

# Reinstall only when the project's requirements change.
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
  [ -x .venv/bin/python ] || "$python" -m venv .venv
  echo "setup: installing the project into .venv (pyfuse3 builds from source)" >&2
  { .venv/bin/pip install --upgrade pip && .venv/bin/pip install -e ".[test]"; } >.venv/install.log 2>&1 \
    || { tail -n 30 .venv/install.log >&2; echo "setup: pip install failed; see .venv/install.log" >&2; exit 1; }
  rm -f .venv/.installed-*
  touch "$stamp"
fi
