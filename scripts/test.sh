#!/usr/bin/env bash
# Runs every test: installs what they need (real Nix), then cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_nix
ensure_test_servers
cargo fmt --all -- --check
cargo test --locked "$@"
