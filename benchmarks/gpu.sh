#!/usr/bin/env bash
# Every GPU check in one command, for one call of a lent GPU machine (at most 580 s of limits).
#
# That machine has its own python3 with a CUDA build of torch and no network: nothing is
# installed, the package runs from src/ (PYTHONPATH).  Each step has its own time limit and
# writes its table to $OUT, so a slow step costs only itself.  Run from the repository root:
#
#     OUT=/tmp/gpu bash benchmarks/gpu.sh        # here: every step says "no CUDA" and skips
#
# What it measures (the README's GPU lines come from these files):
#   test_cuda.txt        tests/test_cuda.py: CUDA results equal the CPU's, no per-iteration host sync
#   deep_f32.json/.txt   benchmarks/deep.py: 1.07M-parameter MLP, time and CUDA peak memory, float32
#   deep_bf16.json/.txt  the same in bfloat16 (autocast losses, float32 solver)
#   meta.json/.txt       benchmarks/meta.py: iMAML / MAML meta-step, 256 vmapped tasks
#   compile.json/.txt    benchmarks/compile.py: eager vs compiled_hypergrad on the GPU
#   distributed.json/.txt benchmarks/distributed.py on 1, 2, 4, 8 gloo ranks (the 16 CPU cores)
set -u
OUT=${OUT:-/tmp/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}

step() {  # step NAME SECONDS COMMAND...: run with a limit, keep its output, never stop the script
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  echo "   exit $? ; last lines:"
  tail -n 25 "$OUT/$name.txt"
}

"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else '')" | tee "$OUT/machine.txt"
step test_cuda 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
# damping 5: at damping 1 this inner solution leaves H + δI indefinite and CG refuses (guide: deep networks)
step deep_f32 100 "$PY" benchmarks/deep.py --device cuda --damping 5 --skip less --out "$OUT/deep_f32.json"
step deep_bf16 80 "$PY" benchmarks/deep.py --device cuda --damping 5 --dtype bfloat16 --skip less \
  --out "$OUT/deep_bf16.json"
step meta 70 "$PY" benchmarks/meta.py --device cuda --tasks 256 --no-memory --out "$OUT/meta.json"
step compile 150 "$PY" benchmarks/compile.py --device cuda --sizes 2000x200 --deq 256x64 --out "$OUT/compile.json"
step distributed 90 "$PY" benchmarks/distributed.py --worlds 1 2 4 8 --out "$OUT/distributed.json"
