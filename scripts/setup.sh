#!/usr/bin/env bash
# Install what a fresh machine lacks (cmake, libclang-dev for bindgen, npm for the
# corpora, a TrueType font for figure text, curl, chromium and its driver, the openai and
# selenium Python packages for the server's tests) and fetch the default models and corpora. Safe to run again: it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
command -v npm >/dev/null 2>&1 || need+=(npm)
[[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]] || need+=(fonts-dejavu-core)
# the server's tests: curl, and a real browser driven through WebDriver
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
if ((${#need[@]})); then
  echo "setup: installing ${need[*]}" >&2
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# the server's real clients: the official openai package and selenium (WebDriver)
python3 -c "import openai, selenium" 2>/dev/null || python3 -m pip install -q "openai==3.51.0" "selenium==4.50.0"
models/fetch.sh all
scripts/fetch-data.sh all
# Default frequency lists for the `frequency` policy, one per default model, built with each
# model's own tokenizer from the fetched corpus (compiles the tool on first run).
mkdir -p data/freq
[[ -s data/freq/smollm2.top256.csv ]] || cargo run --release -q -- freq build --model models/SmolLM2-135M-Instruct.Q4_1.gguf --out data/freq/smollm2.top256.csv
[[ -s data/freq/gemma3.top256.csv ]] || cargo run --release -q -- freq build --model models/gemma-3-270m-q4_k_m.gguf --out data/freq/gemma3.top256.csv
# Default activation calibrations for the `activation` policy (Sec. 4.2: about 2,000 tokens).
mkdir -p data/calib
[[ -s data/calib/smollm2.csv ]] || cargo run --release -q -- calibrate --model models/SmolLM2-135M-Instruct.Q4_1.gguf --out data/calib/smollm2.csv
[[ -s data/calib/gemma3.csv ]] || cargo run --release -q -- calibrate --model models/gemma-3-270m-q4_k_m.gguf --out data/calib/gemma3.csv
