#!/usr/bin/env bash
# Installs the peers the benchmark compares against (s3fs-fuse, rclone, fio), only what is missing,
# and the project itself (./scripts/setup.sh: FUSE, .venv with minerva-mount and SeaweedFS).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

packages=(s3fs rclone fio)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "bench/setup: installing ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
./scripts/setup.sh
