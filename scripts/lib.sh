# Shared by the scripts: make sure real Nix is here, and configure it for local use.
# shellcheck shell=bash

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

ensure_nix() {
  if ! command -v nix-store >/dev/null 2>&1; then
    echo "== installing Nix (Debian package nix-bin)" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nix-bin >/dev/null
  fi
  # No substituters: nothing waits on cache.nixos.org; the new CLI for path-info.
  export NIX_CONFIG=$'substituters =\nexperimental-features = nix-command'
}
