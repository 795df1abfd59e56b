#!/usr/bin/env bash
# One GPU check in under 8 minutes: batched vs naive causal trace on a GPT-2-XL-shaped model, a ROME edit
# and a 1,000-edit MEMIT batch on a 1.24 B-parameter Llama-shaped model in bfloat16, each job's peak memory
# beside the planner's estimate. Writes bench/results/gpu_suite.json (see bench/gpu_suite.py for options:
# --tiny --device cpu runs the same jobs at tiny sizes, which is how the suite is tested without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
exec python bench/gpu_suite.py "$@"
