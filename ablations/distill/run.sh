#!/usr/bin/env bash
# The distillation study of issue 7: students of the bundled ShapesVQA teacher
# (models/shapes-llava, 4 decoder layers) trained on this CPU, one row per recipe, evaluated on
# ShapesVQA's test split unpruned and pruned (FastV after layer 1, keep 0.25), then tabulated by
# ablations/distill/table.py into ablations/distill/RESULTS.md.
#
#   bash ablations/distill/run.sh [--steps N] [--limit N] [--seeds 1,2] [--only a,b] [--out DIR]
#
# --steps   optimizer steps per student (default 400; batch 8)
# --limit   test questions per evaluation (default 600)
# --seeds   training seeds of the key rows (ce, fkl, fkl-prune, every-fkl); other rows the first
# --only    run only these rows (names below); finished rows are skipped on a re-run
# --out     work folder (default ablations/distill/work: data, students, runs, evaluations)
# BIN=DIR   use the `distill` and `prune-bench` binaries in DIR instead of building them (e.g. a
#           copy, so that rebuilding the tree during a long study does not swap them mid-run)
#
# Every run is a `distill train` config written below: the student starts from the teacher's
# first two decoder layers (`distill init-student --layers first:2`; `every-other` for that row),
# shares the teacher's vision tower (frozen) and projector, and trains 400 steps at lr 3e-4 on
# the same ShapesVQA export the teacher's last stage used (a fresh draw of 8000 scenes). The
# vit-* rows give the student a smaller vision tower instead (every other of the teacher's four
# encoder layers, `--vision-layers every-other`), of which only the last layer trains.
set -euo pipefail
cd "$(dirname "$0")/../.."

STEPS=400 LIMIT=600 SEEDS=1 ONLY="" OUT=ablations/distill/work
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) STEPS=$2; shift 2 ;;
    --limit) LIMIT=$2; shift 2 ;;
    --seeds) SEEDS=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    *) echo "unknown flag $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
if [ -z "${BIN:-}" ]; then
  cargo build --release --bin distill --bin prune-bench
  BIN=target/release
fi
TEACHER=models/shapes-llava
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
TEACHER=$(cd "$TEACHER" && pwd)

# Data: the generator settings of the teacher's mixed stage (configs/shapes-teacher-5.toml).
if [ ! -f "$OUT/data/train.json" ]; then
  $BIN/distill shapes --out "$OUT/data" --train 8000 --test 0 --image-size 192 --patch-size 16 \
    --seed 11 --config configs/shapes-teacher-data.json --all-families --describe \
    --shape-colors --shape-positions
fi
for pick in first:2 every-other; do
  d="$OUT/students/${pick//[:-]/}"
  [ -f "$d/model.safetensors" ] || $BIN/distill init-student --teacher "$TEACHER" --out "$d" --layers "$pick"
done
[ -f "$OUT/students/vit2/model.safetensors" ] || $BIN/distill init-student --teacher "$TEACHER" \
  --out "$OUT/students/vit2" --layers first:2 --vision-layers every-other
logits() { # divergence [extra lines]
  printf '\n[distill.logits]\ndivergence = "%s"\ntemperature = 0.7\nweight = 5.0\ntokens = "answer"\n%s\n' "$1" "${2:-}"
}
# name | student | [distill] body (empty: no distillation)
recipe() {
  local fkl; fkl=$(logits forward_kl)
  case "$1" in
    ce) echo "first2|" ;;
    fkl) echo "first2|$fkl" ;;
    rkl) echo "first2|$(logits reverse_kl)" ;;
    jsd) echo "first2|$(logits jsd 'beta = 0.5')" ;;
    fkl-hidden) echo "first2|$fkl
[distill.hidden]
pairs = \"last\"
loss = \"mse\"
tokens = \"all\"
weight = 1.0" ;;
    fkl-attn) echo "first2|$fkl
[distill.attention]
blocks = [\"answer->image\"]
pairs = [[1, 3]]
weight = 100.0" ;;
    every-fkl) echo "everyother|$fkl" ;;
    vit-fkl) echo "vit2|$fkl" ;;
    vit-fkl-align) echo "vit2|$fkl
[distill.vision]
loss = \"mse\"
weight = 0.1" ;;
    fkl-cache) echo "first2|$(logits forward_kl "cache = \"$OUT/teacher-top32.fptc\"")" ;;
    fkl-prune) echo "first2|$fkl
[distill.prune]
layers = [1]
keep = [0.25]
head = \"sum\"
query = \"last_token\"" ;;
    *) echo "unknown row $1" >&2; exit 2 ;;
  esac
}
ROWS="ce fkl fkl-prune rkl jsd fkl-hidden fkl-attn every-fkl fkl-cache vit-fkl vit-fkl-align"
KEY="ce fkl fkl-prune every-fkl"

train_eval() { # row seed
  local row=$1 seed=$2 run="$OUT/runs/$1-s$2"
  # The teacher's top-32 answer rows at T = 0.7, for the cached row.
  if [ "$row" = fkl-cache ] && [ ! -f "$OUT/teacher-top32.fptc" ]; then
    $BIN/distill cache-teacher --teacher "$TEACHER" --data "$OUT/data/train.json" \
      --image-folder "$OUT/data/images" --out "$OUT/teacher-top32.fptc" --top-k 32 \
      --temperature 0.7 --tokens answer --max-len 640 --quiet | tee "$OUT/teacher-top32.txt"
  fi
  local r; r=$(recipe "$row")
  local student=${r%%|*} body=${r#*|}
  local ckpt; ckpt="$run/train/checkpoint-$(printf %06d "$STEPS")"
  if [ ! -f "$ckpt/model.safetensors" ]; then
    mkdir -p "$run"
    {
      echo "model = \"$OUT/students/$student\""
      echo "data = \"$OUT/data/train.json\""
      echo "image_folder = \"$OUT/data/images\""
      echo "output = \"$run/train\""
      echo "seed = $seed"
      echo "steps = $STEPS"
      echo "batch_size = 8"
      echo "lr = 3e-4"
      echo "warmup = 30"
      echo "min_lr_ratio = 0.1"
      echo "weight_decay = 0.05"
      echo "max_grad_norm = 1.0"
      echo "max_len = 640"
      if [ "$student" = vit2 ]; then
        echo "vision_trainable_layers = 1"
      else
        echo "frozen = [\"vision\"]"
      fi
      if [ -n "$body" ]; then
        printf '\n[distill]\nteacher = "%s"\nce_weight = 1.0\n%s\n' "$TEACHER" "$body"
      fi
    } > "$run/config.toml"
    local t0; t0=$(date +%s)
    if [ -f "$run/train/latest.json" ]; then
      $BIN/distill train --config "$run/config.toml" --resume --quiet
    else
      $BIN/distill train --config "$run/config.toml" --quiet
    fi
    echo $(( $(date +%s) - t0 )) > "$run/train_seconds"
  fi
  [ -f "$run/eval/results.csv" ] || eval_model "$ckpt" "$run/eval"
}
eval_model() { # checkpoint out
  $BIN/prune-bench --model "$1" --data "shapes:$LIMIT" --head sum --query last_token --keep 0.25 \
    --prune-layer 1 --seed 0 --out "$2" > /dev/null
}

[ -f "$OUT/teacher/results.csv" ] || eval_model "$TEACHER" "$OUT/teacher"
for row in $ROWS; do
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$row,"* ]]; then continue; fi
  seeds=${SEEDS%%,*}
  [[ " $KEY " == *" $row "* ]] && seeds=${SEEDS//,/ }
  for s in $seeds; do
    echo "== $row seed $s"
    train_eval "$row" "$s"
  done
done
python3 ablations/distill/table.py "$OUT" > ablations/distill/RESULTS.md
cat ablations/distill/RESULTS.md
