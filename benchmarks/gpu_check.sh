#!/usr/bin/env bash
# The GPU window's one command: checks and measurements of the fused Triton kernels, <= 6 minutes.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine, from anywhere (a plain copy of the checkout is enough)
#   bash benchmarks/gpu_check.sh --dry-run    # = DEVICE=cpu: Triton's interpreter, tiny shapes (what CI runs)
#
# Installs nothing. Which kanfast runs: this checkout. If `import kanfast` already finds this checkout
# (an editable install, or PYTHONPATH) it is used as is; if no kanfast is importable, this folder goes on
# PYTHONPATH (a plain checkout imports without an install); if another copy is installed, this checkout
# is put ahead of it and the script says so (KANFAST_CHECK_IMPORT=installed tests the installed copy
# instead). Every phase prints and records kanfast.__file__.
#
# Phase 1 (target shape first: batch 65536, in=out=1024, G=5, k=3, bf16; correctness vs float64, each
# kernel timed, forward+backward, the dense GEMMs, the materialized baseline eager and compiled),
# phase 2 (correctness sweep, in parallel processes, first config of each kernel), phase 3 (more
# shapes, as time allows): see benchmarks/gpu_check.py. If benchmarks/gpu_model.py exists it runs in
# the background from the start (CPU only) and its modelled times are printed beside the measured ones.
#
# Output, in $OUT (else benchmarks/results): gpu_check.jsonl (one record per result, written as it comes,
# each with GPU, versions, date, command, git commit), gpu_check.log (this console), and when the model
# ran gpu_model_target.json + gpu_model.log. Budgets: each phase has a hard limit (timeout) and the whole
# run stops by GPU_CHECK_TOTAL_S (360 s). Environment: PYTHON (python3), OUT, DEVICE (cuda|cpu),
# GPU_CHECK_SHARDS (phase-2 processes: 8, the dry run 2), KANFAST_COMMIT (recorded where there is no .git).
# Exit status: the number of phases that failed (a check failed, a crash, or killed at its limit).
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd -P)
DEVICE=${DEVICE:-cuda}
for arg in "$@"; do
  case "$arg" in
    --dry-run) DEVICE=cpu ;;
    -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (use --dry-run or --help)" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_check.sh: DEVICE must be cuda or cpu, got $DEVICE" >&2; exit 2 ;; esac
PY=${PYTHON:-python3}
RES=${OUT:-$ROOT/benchmarks/results}
mkdir -p "$RES" || exit 2
RES=$(cd "$RES" && pwd -P)
JSONL=$RES/gpu_check.jsonl
LOG=$RES/gpu_check.log
: > "$JSONL"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }

if [ "$DEVICE" = cpu ]; then
  export TRITON_INTERPRET=1
  TOTAL=${GPU_CHECK_TOTAL_S:-240}; P1=120; P2=100; P3=60; SHARDS=${GPU_CHECK_SHARDS:-2}
else
  TOTAL=${GPU_CHECK_TOTAL_S:-360}; P1=170; P2=90; P3=100; SHARDS=${GPU_CHECK_SHARDS:-8}
fi
# seconds a phase may run: at most $1, and never past TOTAL - 5 since the start
cap() { local left=$(( TOTAL - 5 - $(elapsed) )); [ "$left" -lt "$1" ] && echo "$left" || echo "$1"; }
export GPU_CHECK_COMMAND="$([ "$DEVICE" = cpu ] && echo 'DEVICE=cpu ')bash benchmarks/gpu_check.sh $*"
export PYTHONUNBUFFERED=1

# ---- which kanfast
FOUND=$(cd / && "$PY" -c 'import importlib.util as u, os
s = u.find_spec("kanfast")
print(os.path.realpath(s.origin) if s is not None and s.origin else "")' 2>/dev/null)
case "$FOUND" in
  "$ROOT"/*) echo "kanfast: this checkout ($FOUND), importable as it is" ;;
  "") echo "kanfast: not installed; importing this plain checkout (PYTHONPATH=$ROOT)"
      export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" ;;
  *) if [ "${KANFAST_CHECK_IMPORT:-checkout}" = installed ]; then
       echo "kanfast: the installed copy $FOUND (KANFAST_CHECK_IMPORT=installed), not this checkout"
     else
       echo "kanfast: an installed copy ($FOUND) is not this checkout: importing this checkout ahead of it" \
            "(PYTHONPATH=$ROOT; KANFAST_CHECK_IMPORT=installed tests the installed copy)"
       export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
     fi ;;
esac
echo "== gpu_check ($DEVICE), results in $RES, whole run <= ${TOTAL}s =="
"$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)'
command -v nvidia-smi >/dev/null && [ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader

# ---- the speed model (CPU only), in the background from the start
MODEL_PID=""
MODEL_JSON=$RES/gpu_model_target.json
if [ -f "$ROOT/benchmarks/gpu_model.py" ] && { [ "$DEVICE" = cuda ] || [ "${GPU_CHECK_MODEL:-0}" = 1 ]; }; then
  timeout "$(cap $((TOTAL - 20)))" "$PY" "$ROOT/benchmarks/gpu_model.py" --batch 65536 --in 1024 --out 1024 --grid 5 \
    --order 3 --dtype bf16 --json "$MODEL_JSON" > "$RES/gpu_model.log" 2>&1 &
  MODEL_PID=$!
  echo "gpu_model.py: running in the background (pid $MODEL_PID, log $RES/gpu_model.log)"
elif [ -f "$ROOT/benchmarks/gpu_model.py" ]; then
  echo "gpu_model.py: not run in the dry run (GPU_CHECK_MODEL=1 runs it)"
else
  echo "gpu_model.py: benchmarks/gpu_model.py does not exist; no modelled times to compare"
fi

fail=0
run_phase() {  # name, hard limit (s), command...
  local name=$1 limit=$2; shift 2
  if [ "$limit" -lt 10 ]; then echo "== phase $name: skipped, ${limit}s left of the run's ${TOTAL}s =="; fail=$((fail + 1)); return; fi
  echo "== [$(elapsed)s] phase $name (hard limit ${limit}s) =="
  timeout "$limit" "$@"
  local rc=$?
  echo "== [$(elapsed)s] phase $name: exit $rc$([ $rc -eq 124 ] && echo ' (killed at its limit)') =="
  [ $rc -ne 0 ] && fail=$((fail + 1))
}
COMMON=(--device "$DEVICE" --out "$RES")

# ---- phase 1: the target shape
L1=$(cap $P1)
run_phase 1 "$L1" "$PY" "$ROOT/benchmarks/gpu_check.py" --phase 1 "${COMMON[@]}" --budget-s $((L1 - 15))

# ---- phase 2: the correctness sweep, $SHARDS processes, one compile per specialisation
L2=$(cap $P2)
if [ "$L2" -ge 10 ]; then
  echo "== [$(elapsed)s] phase 2 ($SHARDS processes, hard limit ${L2}s) =="
  pids=()
  for i in $(seq 0 $((SHARDS - 1))); do
    KANFAST_TRITON_AUTOTUNE=0 timeout "$L2" "$PY" "$ROOT/benchmarks/gpu_check.py" --phase 2 --shard "$i/$SHARDS" \
      "${COMMON[@]}" --budget-s $((L2 - 15)) &
    pids+=($!)
  done
  p2fail=0
  for pid in "${pids[@]}"; do wait "$pid" || p2fail=$((p2fail + 1)); done
  echo "== [$(elapsed)s] phase 2: $p2fail of $SHARDS processes failed =="
  [ $p2fail -ne 0 ] && fail=$((fail + 1))
else
  echo "== phase 2: skipped, ${L2}s left =="; fail=$((fail + 1))
fi

# ---- phase 3: as time allows
L3=$(cap $P3)
run_phase 3 "$L3" "$PY" "$ROOT/benchmarks/gpu_check.py" --phase 3 "${COMMON[@]}" --budget-s $((L3 - 15))

# ---- measured beside modelled
if [ -n "$MODEL_PID" ]; then
  while kill -0 "$MODEL_PID" 2>/dev/null && [ "$(elapsed)" -lt $((TOTAL - 15)) ]; do sleep 2; done
  if kill -0 "$MODEL_PID" 2>/dev/null; then
    echo "gpu_model.py: still running at $(elapsed)s, stopped; no comparison"; kill "$MODEL_PID" 2>/dev/null
  elif [ -s "$MODEL_JSON" ]; then
    run_phase compare "$(cap 30)" "$PY" "$ROOT/benchmarks/gpu_check.py" --phase compare "${COMMON[@]}" --model-json "$MODEL_JSON"
  else
    echo "gpu_model.py: no $MODEL_JSON (see $RES/gpu_model.log)"
  fi
fi
echo "== done in $(elapsed)s; failed phases: $fail; results: $JSONL =="
exit $fail
