#!/usr/bin/env bash
# Uploads a closure to a local binary cache and has Nix check the result.
#   scripts/quickstart.sh [STORE_PATH] [CACHE_DIR]
# Without STORE_PATH it builds a small demo closure. CACHE_DIR defaults to
# /tmp/narpipe-cache; the signing key is made beside it on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_nix
cargo build --release --locked --bins
root="${1:-}"
cache="${2:-/tmp/narpipe-cache}"
if [ -z "$root" ]; then
  word="demo-$(date +%s)"
  root=$(nix-build --no-out-link --quiet -E "
    let mk = name: deps: derivation { inherit name deps; system = builtins.currentSystem;
          builder = \"/bin/sh\"; PATH = \"/usr/bin:/bin\";
          args = [ \"-c\" \"echo \${name} > \$out; for d in \$deps; do echo \$d >> \$out; done\" ]; };
        a = mk \"$word-a\" []; b = mk \"$word-b\" [ a ]; in mk \"$word-c\" [ b a ]")
fi
keys="$cache.keys"
mkdir -p "$keys"
if [ ! -f "$keys/secret" ]; then
  nix-store --generate-binary-cache-key "narpipe-quickstart-1" "$keys/secret" "$keys/public"
fi
echo "== uploading the closure of $root to file://$cache"
nix-store -qR "$root" | target/release/upload --secret-key-file "$keys/secret" "file://$cache"
fresh=$(mktemp -d)
echo "== checking with Nix: nix copy --from file://$cache into a fresh store"
nix copy --from "file://$cache" --to "$fresh" "$root" \
  --option trusted-public-keys "$(cat "$keys/public")"
rm -rf "$fresh"
echo "OK: $(nix-store -qR "$root" | wc -l) paths of $root are in file://$cache, signed by $(cut -d: -f1 "$keys/public")"
