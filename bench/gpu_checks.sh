#!/usr/bin/env bash
# GPU checks, as one short script for a device machine with one NVIDIA GPU (the CPU CI
# never runs these). Its image has torch, numba and pyarrow but not lmdb, orjson or
# torchdata: put their cp312 wheels in .whl/ first (see the device tool's README), e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl lmdb orjson torchdata
# and run this script with .whl carried. Results go to $OUT (or ./gpu-out).
set -uo pipefail
OUT=${OUT:-./gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$OUT/gpu.txt"
# CUDA cases of the equivalence tests (row cache on the device, NCCL one-rank sharding,
# pinned-memory loading); they skip themselves on CPU-only machines.
python3 -m pytest -q -p no:cacheprovider tests/integration/test_row_cache_equivalence.py \
  tests/integration/test_sharded_train.py tests/unit/test_trainer_data.py tests/unit/test_trainer_device.py \
  2>&1 | tee "$OUT/pytest.txt" | tail -5
python3 bench/trainer.py --rows 200000 --json 2>&1 | tail -1 | tee "$OUT/trainer.json"
python3 bench/row_cache.py --device cuda --json 2>&1 | tail -1 | tee "$OUT/row_cache.json"
python3 bench/sharded_train.py --ranks 1 --json 2>&1 | tail -1 | tee "$OUT/sharded_train.json"
python3 bench/remap.py --json 2>&1 | tail -1 | tee "$OUT/remap.json"
