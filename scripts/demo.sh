#!/usr/bin/env bash
# The end-to-end demo on the embedded defaults: builds, fetches the pretrained weights,
# makes a synthetic data set (or uses the MVTec-AD-layout folder given as $1), fits a
# PatchCore bundle, evaluates it and writes heatmap overlays a person can open.
# Usage: scripts/demo.sh [DATA_DIR]   (output in out/demo/)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin edge-agent
agent=target/release/edge-agent
out=out/demo
mkdir -p "$out"
$agent weights fetch --variants lite0
if [ $# -ge 1 ]; then
  data=$1
else
  data=$out/synthetic
  [ -d "$data/train" ] || $agent synth --out "$data" --seed 1
fi
$agent fit --data "$data" --out "$out/bundle"
$agent eval --bundle "$out/bundle" --data "$data" --out "$out/eval"
echo
echo "heatmap overlays: $out/eval/overlays/ (one PNG per test image)"
