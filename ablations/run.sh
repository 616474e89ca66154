#!/usr/bin/env bash
# The visual-token pruning ablations of SEEDS.md section 1 (issue 8), on both bundled models by
# default, rendered into ablations/REPORT.md by `ablate report`:
#
#   bash ablations/run.sh [--limit N] [--models DIR,DIR] [--data SPEC] [--seed S] [--jobs J]
#                         [--out DIR] [--report FILE]
#
# --limit   questions per configuration (default 600; a smoke run uses a handful)
# --models  LLaVA model directories (default models/shapes-llava,models/shapes-llava-student)
# --data    prune-bench --data: shapes:N (default shapes:LIMIT) or a LLaVA eval .jsonl; with
#           ANSWERS=FILE / IMAGES=DIR in the environment passed on as --answers / --images
# --seed    data and random-baseline seed (default 0)
# --jobs    models studied at once (default 2: one per core of this machine; timings are then
#           measured beside the other model's run, accuracy is unaffected)
# --out     work folder with every prune-bench output (default ablations/work, git-ignored);
#           finished studies are kept and skipped on a re-run, so delete it to start over
# --report  the Markdown report (default ablations/REPORT.md; plots go to plots/ beside it)
# BIN=DIR   use the prune-bench and ablate binaries in DIR instead of building them
#
# Per model, K = min(2, layers - 1):
#   A  the 9 head strategies x keep {0.5, 0.25, 0.11}, query last_token, plus the unpruned run and
#      the random-keep baseline (sum is FastV's plain mean);
#   B  the 9 query strategies with A's best head (`ablate best`: highest mean accuracy over keeps);
#   C  B's best combination with K in 1..min(3, layers - 1), head_keep {0.25, 0.5, 0.75, 1} (with
#      A's best head other than sum when sum won, as sum ignores it),
#      query_n {1, 3, 5, 8} (last_n_tokens), tau {4, 8, 16, 32} (adaptive_by_length), and a
#      PyramidDrop-style plan over layers 1..layers-1 at the same average budget.
set -euo pipefail
cd "$(dirname "$0")/.."
source ablations/lib.sh

LIMIT=600 MODELS=models/shapes-llava,models/shapes-llava-student DATA="" SEED=0 JOBS=2
OUT=ablations/work REPORT=ablations/REPORT.md
while [ $# -gt 0 ]; do
  case "$1" in
    --limit) LIMIT=$2; shift 2 ;;
    --models) MODELS=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --jobs) JOBS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --report) REPORT=$2; shift 2 ;;
    *) echo "unknown flag $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
if [ -z "${BIN:-}" ]; then
  cargo build --release --bin prune-bench --bin ablate
  BIN=target/release
fi
DATA=${DATA:-shapes:$LIMIT}
HEADS=sum,variance,entropy,max_attention,attention_range,sparsity,top_k_sum,weighted_quality,gini_coefficient
QUERIES=last_token,last_n_tokens,last_5_tokens,text_tokens_only,weighted_recent,system_and_text,attention_weighted,max_attention_token,adaptive_by_length
KEEPS=0.5,0.25,0.11
EXTRA=()
[ -n "${ANSWERS:-}" ] && EXTRA+=(--answers "$ANSWERS")
[ -n "${IMAGES:-}" ] && EXTRA+=(--images "$IMAGES")

study() { # model dir
  local m=$1 w layers k
  w="$OUT/$(basename "$m")"
  layers=$("$BIN/ablate" layers --model "$m")
  k=$(( layers - 1 < 2 ? layers - 1 : 2 ))
  # bench NAME FLAGS...: one prune-bench run into $w/NAME, skipped when already finished.
  bench() {
    local d="$w/$1"; shift
    finished "$d" "$BIN/prune-bench" --model "$m" --data "$DATA" "${EXTRA[@]}" --limit "$LIMIT" \
      --seed "$SEED" --keep "$KEEPS" "$@"
    echo "$(basename "$m"): $(basename "$d") done" >&2
  }
  mkdir -p "$w/C"
  bench A --head "$HEADS" --query last_token --prune-layer "$k" --random-baseline --flips 4
  local h q
  h=$("$BIN/ablate" best --results "$w/A/results.csv" --by head)
  bench B --head "$h" --query "$QUERIES" --prune-layer "$k" --flips 4
  q=$("$BIN/ablate" best --results "$w/B/results.csv" --by query)
  bench C/K --head "$h" --query "$q" --prune-layer "$(seq -s, 1 $(( layers - 1 < 3 ? layers - 1 : 3 )))"
  # rho does nothing to sum (every head votes): then sweep it with A's best head that uses it.
  local hr=$h
  [ "$h" = sum ] && hr=$("$BIN/ablate" best --results "$w/A/results.csv" --by head --exclude sum)
  for v in 0.25 0.5 0.75 1; do
    bench "C/head_keep=$v" --head "$hr" --query "$q" --prune-layer "$k" --head-keep "$v"
  done
  for v in 1 3 5 8; do
    bench "C/query_n=$v" --head "$h" --query last_n_tokens --prune-layer "$k" --query-n "$v"
  done
  for v in 4 8 16 32; do
    bench "C/tau=$v" --head "$h" --query adaptive_by_length --prune-layer "$k" --tau "$v"
  done
  if [ "$layers" -gt 2 ]; then
    bench C/pyramid --head "$h" --query "$q" --prune-layer "$k" --pyramid "$(seq -s, 1 $(( layers - 1 )))"
  fi
}

start=$(date +%s)
each_model study
"$BIN/ablate" report --work "$OUT" --out "$REPORT"
echo "study done in $(( $(date +%s) - start )) s" >&2
