#!/usr/bin/env bash
# The project's test command (README, .ci/run): starts the services, builds everything
# once in the release profile, fetches the pretrained weights and test photographs
# through the project's own commands, and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
cargo test --release --workspace --no-run
target/release/edge-agent weights fetch
scripts/fetch-test-photos.sh
cargo test --release --workspace "$@"
