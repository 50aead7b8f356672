#!/usr/bin/env bash
# The whole system on one machine, on the embedded defaults: builds, fetches the pretrained
# weights, makes a synthetic data set (or takes the MVTec-AD-layout folder given as $1),
# fits the edge bundle (Lite0) and the cloud's heavier one (Lite2, larger input, the
# fallback), trains small feature-reconstruction and flow models for the cloud, starts a
# hub (in-process MQTT broker, SQLite, local object folder) and two edge agents that stream
# the test images through it, then prints what happened (bands, escalations, verdicts,
# accuracy against ground truth, latency) and writes heatmap overlays of the escalated
# frames to out/demo/report/escalated/; then leaves the hub running with its review pages
# (an operator account made for the demo) until Ctrl-C.
#
# Usage: scripts/demo.sh [DATA_DIR]     (env: DEMO_FPS, frames per second per camera, default 8;
#        DEMO_PASSWORD, the demo operator's password; DEMO_EXIT=1 to stop after the report)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${INSP_PYTHON:-python3}
fps=${DEMO_FPS:-8}

cargo build --release -p edge-agent -p cloud-hub
agent=target/release/edge-agent
hub=target/release/cloud-hub
out=out/demo
run=$out/run
mkdir -p "$out"
$agent weights fetch --variants lite0 --variants lite2

# Every model holds out the same 20 % of train/good (same share and seed): the fused
# verdict is calibrated on the images all of them held out.
holdout=(--holdout 0.2)
if [ $# -ge 1 ]; then
  data=$1
  edge_band=()
else
  data=$out/synthetic
  [ -d "$data/train" ] || $agent synth --out "$data" --seed 1 --train 120
  # Synthetic defects are easy: a wider uncertain band (OK below the 80th percentile of
  # good scores) gives the cloud some frames to judge.
  edge_band=(--ok-quantile 0.8)
fi
[ -d "$data/test" ] || { echo "error: $data has no test/ folder (MVTec-AD layout expected)" >&2; exit 1; }

rm -rf "$run" "$out/report"
mkdir -p "$run"
echo "== fitting the edge bundle (Lite0) and the cloud bundle (Lite2, larger input)"
$agent fit --data "$data" --out "$run/models/edge" "${holdout[@]}" ${edge_band[@]+"${edge_band[@]}"}
$agent fit --data "$data" --out "$run/cloud" --backbone lite2 --size 320 --blur-sigma 10 "${holdout[@]}"
echo "== training the heavy cloud models (feature reconstruction, normalizing flow; small demo settings)"
$hub train --model recon --data "$data" --out "$run/recon" --size 160 --epochs 6 \
  --hidden 48 --prototypes 32 --attention-dims 24 --time-limit 60 "${holdout[@]}"
$hub train --model flow --data "$data" --out "$run/flow" --size 160 --epochs 6 --flow-steps 4 --time-limit 60 "${holdout[@]}"

free_port() { "$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
broker=$(free_port); grpc=$(free_port); http=$(free_port)

echo "== starting the hub (embedded MQTT broker on 127.0.0.1:$broker, SQLite, local objects)"
$hub serve --data-dir "$run/hub" --broker-listen "127.0.0.1:$broker" \
  --models-dir "$run/models" --heavy-bundle "$run/recon" --heavy-bundle "$run/flow" \
  --cloud-bundle "$run/cloud" \
  --grpc-listen "127.0.0.1:$grpc" --http-listen "127.0.0.1:$http" > "$run/hub.log" 2>&1 &
hub_pid=$!
agents=()
cleanup() {
  for p in "${agents[@]}"; do kill "$p" 2>/dev/null || true; done
  kill "$hub_pid" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT
ready=
for _ in $(seq 1 120); do
  if "$python" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$http/readyz', timeout=1)" 2>/dev/null; then
    ready=1; break
  fi
  kill -0 "$hub_pid" 2>/dev/null || break
  sleep 0.5
done
[ -n "$ready" ] || { echo "error: the hub did not become ready; its log:" >&2; cat "$run/hub.log" >&2; exit 1; }

# Two cameras: the test images dealt alternately, keeping their class folders (the
# ground truth the report reads).
i=0
while IFS= read -r file; do
  rel=${file#"$data/test/"}
  cam=cam-$((i % 2 + 1))
  mkdir -p "$run/cams/$cam/$(dirname "$rel")"
  cp "$file" "$run/cams/$cam/$rel"
  i=$((i + 1))
done < <(find "$data/test" -type f \( -iname '*.png' -o -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.bmp' -o -iname '*.tif' -o -iname '*.tiff' \) | sort)

echo "== streaming $i test frames through two edge agents at $fps frames/s each"
for cam in cam-1 cam-2; do
  INSP_LOG=${INSP_LOG:-warn} $agent run --bundle "$run/models/edge" --exit-when-done \
    --set device.site=demo --set "device.id=$cam" \
    --set source.kind=replay --set "source.path=\"$run/cams/$cam\"" --set "source.rate_fps=$fps" \
    --set "mqtt.port=$broker" --set "spool.dir=\"$run/$cam-spool\"" --set 'http.listen=""' \
    --set routing.verdict_deadline_ms=15000 --set model.reload_check_s=0 \
    > "$run/$cam.log" 2>&1 &
  agents+=($!)
done
status=0
for p in "${agents[@]}"; do wait "$p" || status=$?; done
agents=()
if [ $status -ne 0 ]; then
  echo "error: an edge agent failed; logs in $run/cam-*.log" >&2
  exit $status
fi

echo
echo "== what happened (cloud-hub report)"
$hub report --data-dir "$run/hub" --out "$out/report"
echo
echo "logs: $run/hub.log, $run/cam-1.log, $run/cam-2.log; the hub's database: $run/hub/hub.db"

# The review pages: an operator account for this demo (a real deployment makes its own
# with `cloud-hub users add`), and the hub left running until Ctrl-C.
password=${DEMO_PASSWORD:-demo-operator}
if ! printf '%s\n' "$password" | $hub users add operator --role operator --password-stdin \
    --data-dir "$run/hub" > "$run/users.log" 2>&1; then
  grep -q "already" "$run/users.log" || { cat "$run/users.log" >&2; exit 1; }
fi
echo
echo "== review the escalated frames: http://127.0.0.1:$http/review"
echo "   sign in as operator / $password (keys: g good, d defect, c camera fault, u unsure, j/k next/previous)"
if [ "${DEMO_EXIT:-0}" = 1 ]; then exit 0; fi
echo "   the hub keeps running; Ctrl-C stops it"
wait "$hub_pid"
