# Shared by the study scripts (ablations/run.sh, ablations/methods/run.sh): source it after
# setting $MODELS (comma-separated model folders) and $JOBS.

# finished DIR CMD...: runs CMD (a prune-bench run) with `--out DIR.part`, its output to
# DIR.part.log, unless DIR/results.csv shows DIR already finished; then DIR.part becomes DIR with
# the log as DIR/log.txt and prune-bench's `note:` lines (budgets a method cannot reach), if
# any, as DIR/notes.txt. A failed run prints its log and returns 1.
finished() {
  local d=$1; shift
  [ -f "$d/results.csv" ] && return 0
  rm -rf "$d.part"
  mkdir -p "$(dirname "$d")"
  "$@" --out "$d.part" > "$d.part.log" 2>&1 || { cat "$d.part.log" >&2; return 1; }
  grep '^note:' "$d.part.log" > "$d.part/notes.txt" || rm -f "$d.part/notes.txt"
  mv "$d.part" "$d" && mv "$d.part.log" "$d/log.txt"
}

# each_model FN: runs `FN MODEL_DIR` for every folder of $MODELS, $JOBS at a time; fails when
# one of them does.
each_model() {
  local pids=() m ms
  IFS=, read -ra ms <<< "$MODELS"
  for m in "${ms[@]}"; do
    "$1" "$m" &
    pids+=($!)
    if [ "${#pids[@]}" -ge "$JOBS" ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
  done
  for p in "${pids[@]}"; do wait "$p"; done
}
