#!/usr/bin/env bash
# The benchmark in one command: installs Nix and the zstd CLI if missing, builds release
# binaries, builds the corpus (or takes a root), runs bench/run.py.
# usage: bench/run.sh [--root STORE_PATH] [--rounds N] [--skip-xz] [--out FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_nix
if ! command -v zstd >/dev/null 2>&1; then
  echo "== installing the zstd CLI (Debian package zstd), the baseline for one big path" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq zstd >/dev/null
fi
cargo build --release --locked --bins
exec python3 bench/run.py "$@"
