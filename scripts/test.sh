#!/usr/bin/env bash
# The project's test command (README, .ci/run): starts the services, builds everything
# once in the release profile, fetches the pretrained weights and test photographs
# through the project's own commands, installs Chromium and chromedriver (Debian's) for the
# browser test when missing, and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
# The review pages' browser test drives Debian's Chromium through chromedriver.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq chromium chromium-driver
fi
cargo test --release --workspace --no-run
target/release/edge-agent weights fetch
scripts/fetch-test-photos.sh
cargo test --release --workspace "$@"
