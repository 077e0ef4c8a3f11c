#!/usr/bin/env bash
# The benchmark in one command: installs Nix if missing, builds release binaries,
# builds the corpus (or takes a root: bench/run.sh --root /nix/store/…), runs bench/run.py.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_nix
cargo build --release --locked --bins
exec python3 bench/run.py "$@"
