#!/usr/bin/env bash
# Runs HERE (the CPU machine with the Rust toolchain): builds what scripts/gpu-check.sh runs on
# the GPU machine (which has no Rust and no network) and dry-runs its CPU-side parts.
#
#   scripts/gpu-prepare.sh [DIR]     (default DIR: gpu-bin, ignored by git)
#
# DIR receives: fineprune (the CLI), cuda-tests (tests/cuda.rs), gpu_model-tests
# (tests/gpu_model.rs), all release builds with `--features cuda`, stripped, plus MANIFEST
# (commit, sizes, sha256). The fixtures travel with the checkout (tests/reference). The whole
# folder must stay well under the 64 MiB a GPU run may carry; the total is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-gpu-bin}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

echo "== build (release, --features cuda)"
nice -n 10 cargo build --release --features cuda --bin fineprune
# The test executables' paths come from cargo's JSON messages (their names carry a hash).
msgs=$(mktemp)
trap 'rm -f "$msgs"' EXIT
nice -n 10 cargo test --release --features cuda --test cuda --test gpu_model --no-run \
  --message-format=json >"$msgs"
exe_of() {
  python3 - "$msgs" "$1" <<'PY'
import json, sys
path, name = sys.argv[1], sys.argv[2]
for line in open(path):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == name:
        print(m["executable"])
PY
}

rm -rf "$dir"
mkdir -p "$dir"
cp "$CARGO_TARGET_DIR/release/fineprune" "$dir/fineprune"
for t in cuda gpu_model; do
  exe=$(exe_of "$t" | tail -1)
  [ -n "$exe" ] || { echo "error: no test executable for tests/$t.rs in cargo's output" >&2; exit 1; }
  cp "$exe" "$dir/$t-tests"
done
strip "$dir"/fineprune "$dir"/cuda-tests "$dir"/gpu_model-tests

{
  echo "commit $(git rev-parse HEAD)$(git diff --quiet HEAD -- . ':!gpu-bin' || echo ' (with uncommitted changes)')"
  echo "built $(date -u +%FT%TZ) on $(uname -m)"
  (cd "$dir" && sha256sum fineprune cuda-tests gpu_model-tests)
} >"$dir/MANIFEST"

echo "== contents of $dir"
ls -l "$dir"
total=$(du -cb "$dir"/* | tail -1 | cut -f1)
printf 'total: %d bytes (%.1f MiB; a GPU run carries at most 64 MiB)\n' "$total" "$(echo "$total / 1048576" | bc -l)"
if [ "$total" -gt $((48 * 1048576)) ]; then
  echo "error: $dir is over 48 MiB" >&2
  exit 1
fi

echo "== dry run of gpu-check.sh's CPU-side parts"
bash -n scripts/gpu-check.sh && echo "bash -n scripts/gpu-check.sh: ok"
python3 -c 'import py_compile, sys, tempfile, os
out = os.path.join(tempfile.mkdtemp(), "hf_llava7b.pyc")
py_compile.compile("scripts/hf_llava7b.py", cfile=out, doraise=True)' && echo "py_compile scripts/hf_llava7b.py: ok"
"$dir/fineprune" generate --help >/dev/null && echo "$dir/fineprune generate --help: ok"
# Without a GPU every GPU test must skip and pass.
for t in cuda gpu_model; do
  log=$(mktemp)
  FINEPRUNE_REPO=$PWD "$dir/$t-tests" --test-threads=1 --nocapture >"$log" 2>&1 || {
    cat "$log"
    echo "error: $dir/$t-tests failed here" >&2
    exit 1
  }
  skipped=$(grep -c 'skipped:' "$log")
  echo "$dir/$t-tests: $skipped skipped, $(grep '^test result' "$log")"
  if [ "$skipped" -eq 0 ] && ! "$dir/fineprune" generate --device cuda --model x --prompt x >/dev/null 2>&1 && [ "$t" = gpu_model ]; then
    echo "error: $dir/$t-tests printed no 'skipped' without a GPU" >&2
    exit 1
  fi
  rm -f "$log"
done
# And the CLI names the missing library instead of panicking.
if "$dir/fineprune" generate --device cuda --model tests/reference/llava_gqa --prompt hi 2>/tmp/gpu-prepare-cli.err; then
  echo "note: --device cuda worked here (a GPU is present)"
else
  echo "$dir/fineprune --device cuda without a GPU: $(cat /tmp/gpu-prepare-cli.err)"
fi
rm -f /tmp/gpu-prepare-cli.err
echo "ready: run 'scripts/gpu-check.sh $dir' on the GPU machine (carry $dir)"
