#!/usr/bin/env bash
# One prepared GPU check of the fused Triton kernels (H200 or any CUDA GPU); < 8 minutes.
#
#   bash benchmarks/gpu_check.sh            # on the device machine, from the repository root
#   DEVICE=cpu bash benchmarks/gpu_check.sh # CPU dry run (interpreter, tiny sizes)
#
# 1. `kanfast validate` (kanfast.validate, called directly so no install is needed; every backend vs the float64 reference) in float32 (IEEE dots),
#    bfloat16 and float16, quick case set, autotuning off (one compile per specialisation);
# 2. benchmarks/gpu_check.py checks: tf32/ieee/fp16/bf16 accuracy, NaN/inf rows,
#    bit-identical backward, torch.compile(fullgraph=True);
# 3. benchmarks/gpu_check.py benchmark (autotuned): fused triton fwd+bwd vs materialised
#    basis (eager, torch.compile), the reference, Linear+SiLU and the dense GEMM floor,
#    under a time budget so the whole script stays under 8 minutes.
# Results (JSON/CSV with GPU name, versions, date, command) and logs go to $OUT (or
# benchmarks/results). Exit status: number of failed phases.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DEVICE=${DEVICE:-cuda}
RES=${OUT:-$ROOT/benchmarks/results}
mkdir -p "$RES"
START=$(date +%s)
# Works from a plain checkout: kanfast/triton_backend.py finds kernels/ itself when not installed.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
QUICK=""
[ "$DEVICE" = cpu ] && QUICK="--quick" && export TRITON_INTERPRET=1
fail=0
elapsed() { echo $(( $(date +%s) - START )); }
# seconds a phase may take: at most $1, and never past 470 s after the start (hard cap: < 8 min)
cap() { local left=$(( 470 - $(elapsed) )); [ $left -lt $1 ] && echo $left || echo $1; }

echo "== gpu_check: $( $PY -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no cuda")' ) =="
$PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)'
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

echo "== [$(elapsed)s] 1. kanfast validate (autotune off) =="
for dt in float32 bfloat16 float16; do
  if [ "$DEVICE" = cpu ] && [ "$dt" = bfloat16 ]; then continue; fi
  [ "$(cap 150)" -lt 20 ] && { echo "validate $dt: skipped (time)"; continue; }
  KANFAST_TRITON_FP32=ieee KANFAST_TRITON_AUTOTUNE=0 timeout "$(cap 150)" \
    $PY -c 'import argparse, sys; from kanfast import validate as v; p = argparse.ArgumentParser(); v.add_arguments(p); sys.exit(v.run(p.parse_args(sys.argv[1:])))' \
    --device "$DEVICE" --dtype $dt --quick 2>&1 | tee "$RES/validate_$dt.log"
  rc=${PIPESTATUS[0]}; echo "validate $dt: exit $rc ($(elapsed)s)"; [ $rc -ne 0 ] && fail=$((fail + 1))
done

echo "== [$(elapsed)s] 2. accuracy / NaN / determinism / compile checks (autotune off) =="
KANFAST_TRITON_AUTOTUNE=0 timeout "$(cap 200)" $PY "$ROOT/benchmarks/gpu_check.py" --device "$DEVICE" --skip-bench \
  --tag _checks --out "$RES" $QUICK 2>&1 | tee "$RES/gpu_check_checks.log"
rc=${PIPESTATUS[0]}; echo "checks: exit $rc ($(elapsed)s)"; [ $rc -ne 0 ] && fail=$((fail + 1))

LEFT=$(( 400 - $(elapsed) ))
[ $LEFT -lt 20 ] && LEFT=20
echo "== [$(elapsed)s] 3. benchmark (autotuned, budget ${LEFT}s) =="
timeout "$(cap $((LEFT + 60)))" $PY "$ROOT/benchmarks/gpu_check.py" --device "$DEVICE" --skip-checks --budget-s $LEFT \
  --tag _bench --out "$RES" $QUICK 2>&1 | tee "$RES/gpu_check_bench.log"
rc=${PIPESTATUS[0]}; echo "benchmark: exit $rc ($(elapsed)s)"; [ $rc -ne 0 ] && fail=$((fail + 1))
echo "== done in $(elapsed)s, failed phases: $fail; results in $RES =="
exit $fail
