#!/usr/bin/env bash
# Checks that the CUDA build compiles, on a machine without a GPU or a CUDA install:
# nvcc, the runtime headers and CCCL come from NVIDIA's PyPI wheels into .cache/cuda.
# Not part of the default test run (about 11 minutes on 2 cores).
# Usage: scripts/cuda-check.sh   (env: CUDA_COMPUTE_CAP, default 87 = Jetson Orin)
set -euo pipefail
cd "$(dirname "$0")/.."
root=.cache/cuda
python=${INSP_PYTHON:-python3}
if [ -z "$(find "$root" -name nvcc -type f 2>/dev/null | head -n1)" ]; then
  "$python" -m pip install --quiet --target "$root" "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*"
fi
nvcc=$(find "$root" -name nvcc -type f | head -n1)
chmod +x "$nvcc" "$(dirname "$nvcc")"/* 2>/dev/null || true
cuda_root=$(cd "$(dirname "$nvcc")/.." && pwd)
export PATH="$(dirname "$nvcc"):$PATH"
export CUDA_ROOT="$cuda_root" CUDA_PATH="$cuda_root" CUDA_HOME="$cuda_root"
export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-87}
echo "nvcc: $nvcc ($(nvcc --version | tail -n1))"
cargo check --release --features cuda -p edge-agent
echo "CUDA build check passed (compute capability $CUDA_COMPUTE_CAP)"
