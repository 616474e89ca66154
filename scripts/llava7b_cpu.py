#!/usr/bin/env python3
"""LLaVA-1.5-7B-shaped checkpoint on the CPU (issue 29's 7B numbers): build it, then time fineprune.

  build  Writes a LLaVA-1.5-7B-shaped checkpoint with random bf16 weights (std 0.02, norms 1,
         biases 0; CLIP ViT-L/14-336, 2-layer projector, 32-layer Vicuna-7B-shaped LLaMA,
         vocabulary 32064) as 4 safetensors shards plus config.json, the tokenizer files of
         scripts/hf_llava7b.py and a 336x336 test image. Only numpy and Pillow are needed (no
         torch): the values are drawn from one random pool at random offsets, streamed shard by
         shard, so writing the 14 GB is disk-bound and the script holds ~0.5 GB.
  bench  Runs `fineprune generate` on it (each run under /usr/bin/time for the process's max
         RSS): load time and peak RSS (a one-token text prompt: every LM weight is read once),
         time to first token with the image unpruned and FastV (layer 2) at keep 0.5 / 0.25,
         and decode tokens/s from a short text prompt in bf16 and, with --quantize, Q8_0 / Q4_K;
         `ttft_unpruned_bf16c` is the unpruned run with --bf16-compute (AVX512-BF16 products).
         Results go to --out/llava7b-cpu.json and are printed as a table with the load average.

  python3 scripts/llava7b_cpu.py build --model-dir /work/llava7b
  python3 scripts/llava7b_cpu.py bench --model-dir /work/llava7b [--bin target/release/fineprune]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from hf_llava7b import IMAGE_ID, PAD_ID, QUESTION, VOCAB, tokenizer_files  # noqa: E402

D, FFN, LAYERS, HEADS = 4096, 11008, 32, 32
VD, VFFN, VLAYERS, VHEADS, PATCH, SIZE = 1024, 4096, 24, 16, 14, 336


def config():
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "image_token_index": IMAGE_ID,
        "model_type": "llava",
        "pad_token_id": PAD_ID,
        "projector_hidden_act": "gelu",
        "text_config": {
            "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
            "hidden_act": "silu", "hidden_size": D, "intermediate_size": FFN,
            "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": HEADS,
            "num_hidden_layers": LAYERS, "num_key_value_heads": HEADS, "pad_token_id": PAD_ID,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16", "vocab_size": VOCAB,
        },
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vision_config": {
            "hidden_act": "quick_gelu", "hidden_size": VD, "image_size": SIZE,
            "intermediate_size": VFFN, "layer_norm_eps": 1e-5, "model_type": "clip_vision_model",
            "num_attention_heads": VHEADS, "num_channels": 3, "num_hidden_layers": VLAYERS,
            "patch_size": PATCH, "projection_dim": 768,
        },
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": VOCAB,
    }


def tensors():
    """(name, shape, kind) in file order; kind: w (random), one, zero."""
    v = "vision_tower.vision_model."
    out = [(v + "embeddings.class_embedding", [VD], "w"),
           (v + "embeddings.patch_embedding.weight", [VD, 3, PATCH, PATCH], "w"),
           (v + "embeddings.position_embedding.weight", [(SIZE // PATCH) ** 2 + 1, VD], "w"),
           (v + "pre_layrnorm.weight", [VD], "one"), (v + "pre_layrnorm.bias", [VD], "zero")]
    for i in range(VLAYERS):
        p = f"{v}encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out += [(p + f"self_attn.{n}.weight", [VD, VD], "w"), (p + f"self_attn.{n}.bias", [VD], "zero")]
        out += [(p + "mlp.fc1.weight", [VFFN, VD], "w"), (p + "mlp.fc1.bias", [VFFN], "zero"),
                (p + "mlp.fc2.weight", [VD, VFFN], "w"), (p + "mlp.fc2.bias", [VD], "zero")]
        for n in ("layer_norm1", "layer_norm2"):
            out += [(p + f"{n}.weight", [VD], "one"), (p + f"{n}.bias", [VD], "zero")]
    out += [(v + "post_layernorm.weight", [VD], "one"), (v + "post_layernorm.bias", [VD], "zero"),
            ("multi_modal_projector.linear_1.weight", [D, VD], "w"),
            ("multi_modal_projector.linear_1.bias", [D], "zero"),
            ("multi_modal_projector.linear_2.weight", [D, D], "w"),
            ("multi_modal_projector.linear_2.bias", [D], "zero"),
            ("language_model.model.embed_tokens.weight", [VOCAB, D], "w")]
    for i in range(LAYERS):
        p = f"language_model.model.layers.{i}."
        out += [(p + f"self_attn.{n}.weight", [D, D], "w") for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        out += [(p + "mlp.gate_proj.weight", [FFN, D], "w"), (p + "mlp.up_proj.weight", [FFN, D], "w"),
                (p + "mlp.down_proj.weight", [D, FFN], "w"),
                (p + "input_layernorm.weight", [D], "one"), (p + "post_attention_layernorm.weight", [D], "one")]
    out += [("language_model.model.norm.weight", [D], "one"), ("language_model.lm_head.weight", [VOCAB, D], "w")]
    return out


def build(args):
    import numpy as np
    from PIL import Image

    os.makedirs(args.model_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    # bf16 bits of N(0, 0.02): the top half of the f32 bits.
    pool = ((rng.standard_normal(1 << 24, dtype=np.float32) * 0.02).view(np.uint32) >> 16).astype(np.uint16)
    one, zero = np.uint16(0x3F80), np.uint16(0)
    ts = tensors()
    sizes = [2 * int(np.prod(s)) for _, s, _ in ts]
    total = sum(sizes)
    shards, acc = [[]], 0
    for t, n in zip(ts, sizes):
        if acc >= total / args.shards and len(shards) < args.shards:
            shards.append([])
            acc = 0
        shards[-1].append((t, n))
        acc += n
    weight_map = {}
    t0 = time.monotonic()
    for si, shard in enumerate(shards):
        fname = f"model-{si + 1:05d}-of-{len(shards):05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for (name, shape, _), n in shard:
            header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + n]}
            off += n
            weight_map[name] = fname
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        path = os.path.join(args.model_dir, fname)
        with open(path + ".tmp", "wb") as f:
            f.write(len(h).to_bytes(8, "little") + h)
            for (name, shape, kind), n in shard:
                left = n // 2
                while left:
                    k = min(left, 1 << 22)
                    if kind == "w":
                        s = int(rng.integers(0, pool.size - k + 1))
                        f.write(pool[s:s + k].tobytes())
                    else:
                        f.write(np.full(k, one if kind == "one" else zero, np.uint16).tobytes())
                    left -= k
        os.replace(path + ".tmp", path)
        print(f"wrote {fname} ({off / 1e9:.2f} GB, {time.monotonic() - t0:.0f} s)", flush=True)
    with open(os.path.join(args.model_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(args.model_dir, "config.json"), "w") as f:
        json.dump(config(), f, indent=1)
    tokenizer_files(args.model_dir)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    img = np.stack([xx * 255 // (SIZE - 1), yy * 255 // (SIZE - 1), (xx + yy) * 255 // (2 * SIZE - 2)], -1)
    img[60:200, 40:180] = [210, 40, 35]
    Image.fromarray(img.astype(np.uint8), "RGB").save(os.path.join(args.model_dir, "bench.png"))
    print(f"{args.model_dir}: {total / 1e9:.2f} GB of bf16 weights in {len(shards)} shards")


def run(args, label, extra):
    """One `fineprune generate` run; returns its timings plus max RSS (GiB) and wall seconds."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as tj, \
            tempfile.NamedTemporaryFile("r", suffix=".rss") as tr:
        cmd = ["/usr/bin/time", "-f", "%M %e", "-o", tr.name, args.bin, "generate",
               "--model", args.model_dir, "--ignore-eos", "--timings", tj.name] + extra
        print(f"== {label}: {' '.join(cmd[5:])}", flush=True)
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            print(p.stderr[-2000:], flush=True)
            return {"error": p.stderr.strip().splitlines()[-1:] if p.stderr else p.returncode}
        rss_kib, wall = tr.read().split()[-2:]
        t = json.load(open(tj.name))
    t["max_rss_gib"] = int(rss_kib) / 2**20
    t["wall_secs"] = float(wall)
    t["loadavg"] = open("/proc/loadavg").read().split()[0]
    print(json.dumps(t), flush=True)
    return t


def bench(args):
    img = ["--image", os.path.join(args.model_dir, "bench.png"), "--prompt", QUESTION, "--max-new-tokens", "1"]
    text = ["--raw", "--prompt", "The capital of France is", "--max-new-tokens", str(args.new_tokens)]
    runs = [("load", ["--raw", "--prompt", "Hi", "--max-new-tokens", "1"]),
            ("ttft_unpruned", img),
            ("ttft_keep0.5", img + ["--prune-layer", "2", "--keep", "0.5"]),
            ("ttft_keep0.25", img + ["--prune-layer", "2", "--keep", "0.25"]),
            ("ttft_unpruned_bf16c", img + ["--bf16-compute"]),
            ("decode_bf16", text)]
    runs += [(f"decode_{q}", text + ["--quantize", q]) for q in args.quantize]
    size = sum(os.path.getsize(os.path.join(args.model_dir, f))
               for f in os.listdir(args.model_dir) if f.endswith(".safetensors"))
    out = {"checkpoint_gib": size / 2**30, "runs": {}}
    for label, extra in runs:
        if args.only and label not in args.only:
            continue
        out["runs"][label] = run(args, label, extra)
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "llava7b-cpu.json")
        with open(path + ".tmp", "w") as f:
            json.dump(out, f, indent=1)
        os.replace(path + ".tmp", path)
    print(f"\ncheckpoint {out['checkpoint_gib']:.2f} GiB; RAYON_NUM_THREADS={os.environ.get('RAYON_NUM_THREADS', 'all')}")
    print(f"{'run':16} {'load s':>7} {'TTFT s':>8} {'prefill s':>9} {'decode tok/s':>12} {'max RSS GiB':>11} {'load avg':>8}")
    for label, t in out["runs"].items():
        if "error" in t:
            print(f"{label:16} error: {t['error']}")
            continue
        dec = (t["new_tokens"] - 1) / t["decode_secs"] if t.get("decode_secs") and t["new_tokens"] > 1 else float("nan")
        print(f"{label:16} {t['load_secs']:7.2f} {t['first_token_secs']:8.2f} {t['prefill_secs']:9.2f} "
              f"{dec:12.2f} {t['max_rss_gib']:11.2f} {t['loadavg']:>8}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["build", "bench"])
    ap.add_argument("--model-dir", default="/tmp/llava7b")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--bin", default=os.path.join(HERE, "..", "target", "release", "fineprune"))
    ap.add_argument("--out", default=os.path.join(HERE, "..", "target", "llava7b"))
    ap.add_argument("--new-tokens", type=int, default=9, help="decode runs: new tokens (the first is the prefill's)")
    ap.add_argument("--quantize", nargs="*", default=["q8_0", "q4_k"], help="decode runs with --quantize")
    ap.add_argument("--only", nargs="*", help="run only these labels")
    args = ap.parse_args()
    build(args) if args.what == "build" else bench(args)


if __name__ == "__main__":
    main()
