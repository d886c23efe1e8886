#!/usr/bin/env bash
# Cross-layer transcoder training speed on one CUDA GPU (H100/H200: under 5 minutes, no download). See the Python
# file's docstring for what is measured; `python tests/bench/bench_clt_gpu.py --dry-run` checks it on CPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 290 python tests/bench/bench_clt_gpu.py "$@"
