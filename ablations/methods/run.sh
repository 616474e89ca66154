#!/usr/bin/env bash
# The peer pruning methods at matched budgets (issue 31), on both bundled models by default,
# rendered into ablations/methods/REPORT.md by `ablate methods`:
#
#   bash ablations/methods/run.sh [--limit N] [--models DIR,DIR] [--seed S] [--jobs J]
#                                 [--budgets B,..] [--out DIR] [--report FILE]
#
# --limit    ShapesVQA questions per configuration (default 600)
# --models   LLaVA model directories (default models/shapes-llava,models/shapes-llava-student)
# --seed     questions and random-baseline seed (default 0)
# --jobs     models studied at once (default 2, one per core; timings are then measured beside
#            the other model's run)
# --budgets  image tokens averaged over the LM layers, as fractions of the image tokens
#            (default 0.6667,0.3333,0.2222,0.1111: LLaVA-1.5's 384, 192, 128 and 64 of 576)
# --out      work folder (default ablations/methods/work, git-ignored); finished runs are kept
#            and skipped on a re-run, so delete it to start over
# --report   the Markdown report (default ablations/methods/REPORT.md; plots/ beside it)
# BIN=DIR    use the prune-bench and ablate binaries in DIR instead of building them
#
# Per model, on the same questions (so every difference is paired):
#   methods/  unpruned; fastv (sum, last_token), random, dart, pool, fastervlm, visionzip, pdrop,
#             sparsevlm, each solved to every budget (prune-bench --avg-budget), in-LM single
#             stages at K = 1 (the only K that reaches the smaller budgets on these shallow LMs);
#   best/     FastV with the best head x query combination of the strategy study, read from
#             ablations/REPORT.md ("Study C: sensitivity of HEAD + QUERY" under the model).
set -euo pipefail
cd "$(dirname "$0")/../.."
source ablations/lib.sh

LIMIT=600 MODELS=models/shapes-llava,models/shapes-llava-student SEED=0 JOBS=2
BUDGETS=0.6667,0.3333,0.2222,0.1111 OUT=ablations/methods/work REPORT=ablations/methods/REPORT.md
while [ $# -gt 0 ]; do
  case "$1" in
    --limit) LIMIT=$2; shift 2 ;;
    --models) MODELS=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --jobs) JOBS=$2; shift 2 ;;
    --budgets) BUDGETS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --report) REPORT=$2; shift 2 ;;
    *) echo "unknown flag $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
if [ -z "${BIN:-}" ]; then
  cargo build --release --bin prune-bench --bin ablate
  BIN=target/release
fi
METHODS=fastv,random,dart,pool,fastervlm,visionzip,pdrop,sparsevlm

study() { # model dir
  local m=$1 w name best
  name=$(basename "$m")
  w="$OUT/$name"
  best=$(awk -v m="$name" '/^## /{cur=$2} cur==m && /^### Study C: sensitivity of /{
    sub(/^### Study C: sensitivity of /, ""); print; exit}' ablations/REPORT.md)
  if [ -z "$best" ]; then
    echo "ablations/REPORT.md has no strategy study of $name: run ablations/run.sh first" >&2
    return 1
  fi
  # bench NAME FLAGS...: one prune-bench run into $w/NAME, skipped when already finished; its
  # notes (budgets a method cannot reach) go to NAME/notes.txt.
  bench() {
    local d="$w/$1"; shift
    finished "$d" "$BIN/prune-bench" --model "$m" --data "shapes:$LIMIT" --limit "$LIMIT" \
      --seed "$SEED" --avg-budget "$BUDGETS" --prune-layer 1 "$@"
    echo "$name: $(basename "$d") done" >&2
  }
  bench methods --method "$METHODS" --head sum --query last_token
  bench best --method fastv --head "${best% + *}" --query "${best#* + }"
}

start=$(date +%s)
each_model study
"$BIN/ablate" methods --work "$OUT" --out "$REPORT"
echo "study done in $(( $(date +%s) - start )) s" >&2
