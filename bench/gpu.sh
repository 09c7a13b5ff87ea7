#!/usr/bin/env bash
# The GPU benchmark in one command (bench/gpu.py: SFT tokens/s and MFU vs plain TRL, DPO memory and step time vs
# TRL's resident reference, hf-backend K=16 sampling), about 5-10 minutes on one H100/H200:
#   bash bench/gpu.sh                                   # 1B-class Llama, bf16, seq 2048
#   bash bench/gpu.sh --size tiny --seq 256 --steps 3   # a CPU check of the same code
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
exec "$PYTHON" bench/gpu.py "$@"
