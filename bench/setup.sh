#!/usr/bin/env bash
# Installs the peers the benchmark compares against (s3fs-fuse, rclone, fio), only what is missing,
# with the project itself: scripts/setup.sh takes extra Debian packages as arguments.
set -euo pipefail
exec "$(cd "$(dirname "$0")/.." && pwd)/scripts/setup.sh" s3fs rclone fio
