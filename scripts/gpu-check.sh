#!/usr/bin/env bash
# The GPU machine's one command (no Rust, no network there): runs the prebuilt binaries from
# scripts/gpu-prepare.sh, in under 8 minutes, from the repository root (the fixtures are read
# from tests/reference).
#
#   scripts/gpu-check.sh [DIR]        (default DIR: gpu-bin)
#
# Writes $OUT/gpu-check.log (everything) and $OUT/gpu-check.tsv (one row per step: step, status
# pass|fail|timeout|not-run, seconds, detail; then `metric:*` rows from the benchmark), where OUT
# defaults to ./gpu-check-out. Steps: nvidia-smi; the kernel tests (tests/cuda.rs); the model
# tests (tests/gpu_model.rs); a CLI smoke run; the LLaVA-1.5-7B-shaped benchmark
# (scripts/hf_llava7b.py: HF transformers vs fineprune, unpruned and FastV). A failing step is
# logged and the next one runs. The tests run with FINEPRUNE_REQUIRE_GPU=1: a GPU that does not
# open is a failure, not a skip.
#
# Libraries: the CUDA driver (libcuda.so.1) comes with the driver. NVRTC: FINEPRUNE_NVRTC if set,
# else the newest libnvrtc.so.1N found by ldconfig, under /usr/local/cuda*, or in the nvidia pip
# wheels (CUDA 13's libnvrtc.so.13 is accepted). cuBLAS: cudarc (built for CUDA 12) looks for
# libcublas.so / libcublas.so.12; with only CUDA 13's libcublas.so.13 present, a folder of
# unversioned links to it is put first on LD_LIBRARY_PATH.
set -u
cd "$(dirname "$0")/.."
BIN=$(cd "${1:-gpu-bin}" 2>/dev/null && pwd) || { echo "error: no folder ${1:-gpu-bin} (run scripts/gpu-prepare.sh first)" >&2; exit 2; }
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
LOG=$OUT/gpu-check.log
RES=$OUT/gpu-check.tsv
BUDGET=${GPU_CHECK_BUDGET:-470} # seconds for everything; 8 minutes is the hard limit
START=$SECONDS
: >"$LOG"
printf 'step\tstatus\tseconds\tdetail\n' >"$RES"
log() { echo "$*" | tee -a "$LOG"; }
left() { echo $((BUDGET - (SECONDS - START))); }

# step NAME LIMIT CMD...: runs CMD under min(LIMIT, time left), output to the log, one TSV row.
step() {
  local name=$1 limit=$2 rem t0 rc status detail out
  shift 2
  rem=$(left)
  if [ "$rem" -lt 15 ]; then
    log "== $name: not run (${rem}s left)"
    printf '%s\tnot-run\t0\ttime budget\n' "$name" >>"$RES"
    return
  fi
  [ "$limit" -gt "$rem" ] && limit=$rem
  log "== $name (limit ${limit}s): $*"
  out=$(mktemp)
  t0=$SECONDS
  timeout -k 10 "$limit" "$@" >"$out" 2>&1
  rc=$?
  cat "$out" >>"$LOG"
  case $rc in
    0) status=pass ;;
    124 | 137) status=timeout ;;
    *) status=fail ;;
  esac
  detail="exit $rc"
  if grep -q '^test result' "$out"; then
    detail="$(grep '^test result' "$out" | sed 's/; finished.*//' | paste -sd' ' -); $(grep -c 'skipped:' "$out") skipped"
  fi
  if [ "$status" != pass ]; then
    detail="$detail; $(grep -E 'panicked|^error|Error|FAILED' "$out" | head -3 | tr '\t\n' '  ' | cut -c1-300)"
  fi
  rm -f "$out"
  log "-- $name: $status ($((SECONDS - t0))s) $detail"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" "$detail" >>"$RES"
}

# The newest library matching $1 (e.g. libnvrtc.so.1) on this machine.
find_lib() {
  {
    ldconfig -p 2>/dev/null | awk -v p="$1" 'index($1, p) == 1 {print $NF}'
    ls /usr/local/cuda*/lib64/"$1"* /usr/local/cuda*/targets/*/lib/"$1"* 2>/dev/null
    python3 - "$1" 2>/dev/null <<'PY'
import glob, os, sys
try:
    import nvidia
    for root in nvidia.__path__:
        for f in glob.glob(os.path.join(root, "**", sys.argv[1] + "*"), recursive=True):
            print(f)
except Exception:
    pass
PY
  } | grep -E "/$1[0-9]+(\.[0-9]+)*$" | grep -v -e builtins -e '\.alt\.' | sort -V | tail -1
}

log "gpu-check $(date -u +%FT%TZ) on $(hostname); binaries: $BIN"
[ -f "$BIN/MANIFEST" ] && cat "$BIN/MANIFEST" >>"$LOG"
shim=$OUT/lib-shim
mkdir -p "$shim"
if [ -z "${FINEPRUNE_NVRTC:-}" ]; then
  nvrtc=$(find_lib libnvrtc.so.1)
  [ -n "$nvrtc" ] && export FINEPRUNE_NVRTC=$nvrtc
fi
log "NVRTC: ${FINEPRUNE_NVRTC:-not found}"
extra=""
for lib in libcublas.so libcublasLt.so; do
  real=$(find_lib "$lib.1")
  if [ -n "$real" ]; then
    ln -sfn "$real" "$shim/$lib"
    extra="$extra:$(dirname "$real")"
  fi
  log "$lib: ${real:-not found}"
done
export LD_LIBRARY_PATH="$shim$extra${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export FINEPRUNE_REQUIRE_GPU=1 FINEPRUNE_REPO=$PWD FINEPRUNE_CACHE=$OUT/ptx-cache RUST_BACKTRACE=1

step nvidia-smi 20 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
step kernel-tests 90 "$BIN/cuda-tests" --nocapture --test-threads=1
step model-tests 150 "$BIN/gpu_model-tests" --nocapture --test-threads=1
step cli-smoke 40 "$BIN/fineprune" generate --device cuda --model tests/reference/llava_gqa \
  --image tests/reference/images/tiny_scene.png --prompt "What color is the big square?" \
  --max-new-tokens 8 --prune-layer 2 --keep 0.5 --timings "$OUT/cli-smoke.json"
rem=$(left)
step llava7b-bench "$rem" python3 scripts/hf_llava7b.py --bin "$BIN/fineprune" --out "$OUT" \
  --results "$RES" --deadline $((rem - 15))

log "== summary ($((SECONDS - START))s)"
summary=$(column -t -s $'\t' "$RES" 2>/dev/null || cat "$RES")
echo "$summary" | tee -a "$LOG"
! grep -qE $'\t(fail|timeout)\t' "$RES"
