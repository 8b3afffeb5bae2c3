#!/usr/bin/env bash
# GPU checks, as one short script for a device machine with one NVIDIA GPU (the CPU CI
# never runs these). Its image has torch, numba, pyarrow, pytest and hypothesis but not lmdb,
# orjson or torchdata: put their cp312 wheels in .whl/ first (see the device tool's README), e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl lmdb orjson torchdata
# and run this script with .whl carried, e.g. run(command="bash bench/gpu_checks.sh",
# carry=[".whl"], timeout_s=560).
#
# Steps run highest priority first, each under `timeout` capped by what is left of BUDGET_S
# (default 480 s of the 15-minute device lease, which includes the machine's start); a step
# that would start with under 20 s left is skipped and says so. Results go to $OUT (or
# ./gpu-out), two files because only 8 come back: results.txt (per step its exit status,
# seconds and last output line: the --json line of a bench) and gpu_checks.log (everything).
set -uo pipefail
OUT=${OUT:-./gpu-out}
BUDGET_S=${BUDGET_S:-480}
mkdir -p "$OUT"
START=$(date +%s)
RESULTS="$OUT/results.txt"
LOG="$OUT/gpu_checks.log"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$RESULTS"

# step NAME CAP_S CMD...: run CMD under a timeout of min(CAP_S, budget left).
step() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET_S - ($(date +%s) - START)))
  if ((left < 20)); then
    echo "## $name SKIPPED: ${left} s of the budget left" | tee -a "$RESULTS"
    return
  fi
  local limit=$((cap < left ? cap : left)) t0
  t0=$(date +%s)
  echo "## $name: $*" >>"$LOG"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/step.log" 2>&1
  local rc=$?
  cat "$OUT/step.log" >>"$LOG"
  echo "## $name rc=$rc $(($(date +%s) - t0)) s (limit $limit s)$( ((rc == 124)) && echo ' TIMED OUT')" | tee -a "$RESULTS"
  tail -n 1 "$OUT/step.log" | tee -a "$RESULTS"
  rm -f "$OUT/step.log"
}

PYTEST=(python3 -m pytest -q -p no:cacheprovider)
# Issue 9: fused tables and sparse optimizers on CUDA (bitwise init and rounding, no host
# sync in fuse, CPU/CUDA agreement), then the trainer against the plain-PyTorch baseline at
# the Criteo-Kaggle shape (batch 65536, 26 tables capped at 10M rows).
step fused_cuda_tests 90 "${PYTEST[@]}" tests/trainer/test_fused_embedding.py \
  tests/trainer/test_sparse_optim.py -k cuda
step gpu_train_d16 150 python3 bench/gpu_train.py --device cuda --dim 16 --json
step gpu_train_d16_bf16 90 python3 bench/gpu_train.py --device cuda --dim 16 --precision bf16 \
  --no-row-cache --json
# [model] interaction's default (the pooled embeddings in the top MLP too) against the same
# baseline: what the default model costs over the reference DLRM's dots alone.
step gpu_train_d16_dot_concat 90 python3 bench/gpu_train.py --device cuda --dim 16 --precision bf16 \
  --no-row-cache --interaction dot_concat --json
step gpu_train_d64 100 python3 bench/gpu_train.py --device cuda --dim 64 --no-row-cache \
  --train-batches 60 --steps 120 --json
step gpu_train_d128 140 python3 bench/gpu_train.py --device cuda --dim 128 --no-row-cache \
  --train-batches 60 --steps 120 --json
# Earlier issues: CUDA cases of the equivalence tests (row cache on the device, NCCL one-rank
# sharding, pinned-memory loading; they skip themselves on CPU-only machines), then benches.
step equivalence_tests 120 "${PYTEST[@]}" tests/trainer/test_row_cache_equivalence.py \
  tests/trainer/test_sharded_train.py tests/trainer/test_trainer_data.py tests/trainer/test_trainer_device.py
step trainer 60 python3 bench/trainer.py --rows 200000 --json
step row_cache 60 python3 bench/row_cache.py --device cuda --json
step sharded_train 60 python3 bench/sharded_train.py --ranks 1 --json
step remap 40 python3 bench/remap.py --json
echo "## total $(($(date +%s) - START)) s" | tee -a "$RESULTS"
