#!/usr/bin/env bash
# Issue 25's hostile inputs through the CLI, from the fuzz corpus: one table row each with the
# exit code, wall time, max RSS (GNU time) and the first line of stderr.
# Run from anywhere after `cargo build --release --bins`: bash tests/fuzz/cli_cases.sh
set -u
cd "$(dirname "$0")/../.."
B=target/release
C=tests/fuzz/corpus
T=$(mktemp -d)
echo "| input | exit | wall | max RSS | first line of stderr |"
echo "|---|---|---|---|---|"
row() { # name, command...
  local name=$1; shift
  /usr/bin/time -f "%e %M" -o $T/time "$@" > $T/out 2> $T/err; local rc=$?
  read -r secs kb < <(tail -1 $T/time)
  printf "| %s | %s | %s s | %s MiB | %s |\n" "$name" "$rc" "$secs" "$((kb/1024))" "$(grep -v '^\s*$' $T/err | grep -v 'Command exited' | head -1 | cut -c1-150)"
}
M=models/shapes-llava
Q="What shape is it?"
row "PNG 100000x1 (resize)" $B/fineprune generate --model $M --image $C/png/class1_resize_100000x1.png --prompt "$Q" --max-new-tokens 2
row "PNG 20000x4 --pad-to-square" $B/fineprune generate --model $M --image $C/png/class1_pad_to_square_20000x4.png --pad-to-square --prompt "$Q" --max-new-tokens 2
row "1-bit PNG 20000x20000" $B/fineprune generate --model $M --image $C/png/class1_rgb_convert_1bit_20000x20000.png --prompt "$Q" --max-new-tokens 2
row "JPEG 65500x11 --pad-to-square" $B/fineprune generate --model $M --image $C/jpeg/class1_pad_to_square_65500x11.jpg --pad-to-square --prompt "$Q" --max-new-tokens 2
row "--image /dev/zero" $B/fineprune generate --model $M --image /dev/zero --prompt "$Q" --max-new-tokens 2
row "GGUF block_count 1e7" $B/fineprune inspect --model $C/gguf/class1_block_count_1e7.gguf
row "GGUF block_count 2^32-1" $B/fineprune inspect --model $C/gguf/class1_block_count_u32max.gguf
row "GGUF NaN weight" $B/fineprune generate --model $C/gguf/class3_nan_in_weights.gguf --prompt hi --max-new-tokens 2
for f in $C/preprocessor_json/class*.json; do
  d=$T/m-$(basename $f .json); mkdir -p $d; cp $M/* $d/; cp $f $d/preprocessor_config.json
  row "preprocessor $(basename $f .json)" $B/fineprune generate --model $d --image $M/example.png --prompt "$Q" --max-new-tokens 2
done
for f in $C/config_json/class*.json; do
  d=$T/c-$(basename $f .json); mkdir -p $d; cp tests/reference/llava_tied/* $d/; cp $f $d/config.json
  row "config $(basename $f .json)" $B/fineprune generate --model $d --image tests/reference/images/tiny_scene.png --prompt "$Q" --max-new-tokens 2
done
python3 - "$T" <<'PY'
import struct, sys
# pixel values: NaN, and a [2,3,H,W] batch (read the model's size from config)
import json
t = sys.argv[1]
def st(path, shape, vals):
    data = struct.pack(f"<{len(vals)}f", *vals)
    hdr = json.dumps({"pixel_values": {"dtype": "F32", "shape": shape, "data_offsets": [0, len(data)]}}).encode()
    hdr += b" " * ((8 - len(hdr) % 8) % 8)
    open(path, "wb").write(struct.pack("<Q", len(hdr)) + hdr + data)
n = 3*30*30
st(f"{t}/nan.safetensors", [1,3,30,30], [float("nan")] + [0.0]*(n-1))
st(f"{t}/batch.safetensors", [2,3,30,30], [0.0]*(2*n))
PY
row "--pixel-values NaN" $B/fineprune logits --model tests/reference/llava_tied --pixel-values $T/nan.safetensors --prompt "$Q" --out $T/l.safetensors
row "--pixel-values [2,3,30,30]" $B/fineprune logits --model tests/reference/llava_tied --pixel-values $T/batch.safetensors --prompt "$Q" --out $T/l.safetensors
rm -rf $T
