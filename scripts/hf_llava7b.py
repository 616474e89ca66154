#!/usr/bin/env python3
"""LLaVA-1.5-7B-shaped benchmark on the GPU machine: HF transformers against `fineprune`.

No network there and no real checkpoint: this builds a LLaVA-1.5-7B-shaped model with random
bf16 weights (CLIP ViT-L/14-336 tower, 2-layer GELU MLP projector, 32-layer Vicuna-7B-shaped
LLaMA, vocabulary 32064 with <image> = 32000 and <pad> = 32001, as llava-hf/llava-1.5-7b-hf),
saves it with save_pretrained to --model-dir with a tokenizer.json derived from the tiny fixture's
(tests/reference/llava_gqa: same BPE, vocabulary padded to 32064 ids), then times at batch 1 on a
336x336 image (576 image tokens) and a short question:

  hf        transformers (attn_implementation="sdpa", bf16): time to first token (generate with
            one new token, pixel values precomputed) and decode steps per second
            (N / (t(N + 1 new tokens) - t(1))), medians of 3 and 2 runs after a warm-up;
  fineprune `fineprune generate --device cuda --warmup --timings`, unpruned and FastV
            (--prune-layer 2) at keep 0.5 and 0.25: first_token_secs (image preprocessing,
            vision tower, projector, prefill), prefill_secs, and (new_tokens - 1) / decode_secs.

The weights are random, so only the timings mean anything (the texts are noise). Every phase
is guarded: a failure is recorded with its error and the next phase runs. Results go to
OUT/llava7b-bench.json and, as `metric:*` rows, to the TSV given with --results.

Usage: python3 scripts/hf_llava7b.py --bin gpu-bin/fineprune --out $OUT [--results FILE]
       [--deadline SECONDS] [--layers 32] [--new-tokens 64]
"""
import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "..", "tests", "reference", "llava_gqa")
QUESTION = "What is in the image? Describe the shapes, their colors and where they are."
VOCAB, IMAGE_ID, PAD_ID = 32064, 32000, 32001
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]


class Bench:
    """Phase bookkeeping: results, TSV rows, the deadline."""

    def __init__(self, args):
        self.args = args
        self.start = time.monotonic()
        self.out = {"phases": {}, "hf": {}, "fineprune": {}}
        self.json_path = os.path.join(args.out, "llava7b-bench.json")

    def left(self):
        if self.args.deadline is None:
            return float("inf")
        return self.args.deadline - (time.monotonic() - self.start)

    def row(self, step, status, secs, detail):
        if self.args.results:
            with open(self.args.results, "a") as f:
                f.write(f"{step}\t{status}\t{secs}\t{detail}\n")

    def metric(self, name, value):
        print(f"metric {name} = {value}", flush=True)
        self.row(f"metric:{name}", "value", "", value)

    def phase(self, name, need_secs, fn):
        """Runs fn() unless less than need_secs remain; records pass/fail/not run."""
        if self.left() < need_secs:
            self.out["phases"][name] = {"status": "not run", "why": f"under {need_secs} s left"}
            self.row(f"bench:{name}", "not-run", 0, "time budget")
            print(f"== {name}: not run (under {need_secs} s left)", flush=True)
            return None
        print(f"== {name}", flush=True)
        t = time.monotonic()
        try:
            r = fn()
            status, detail = "pass", ""
        except Exception as e:  # noqa: BLE001 - every failure is recorded, the next phase runs
            traceback.print_exc()
            r, status, detail = None, "fail", f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
        secs = round(time.monotonic() - t, 1)
        self.out["phases"][name] = {"status": status, "secs": secs, "error": detail or None}
        self.row(f"bench:{name}", status, secs, detail)
        self.save()
        return r

    def save(self):
        os.makedirs(self.args.out, exist_ok=True)
        with open(self.json_path, "w") as f:
            json.dump(self.out, f, indent=1)


def tokenizer_files(model_dir):
    """tokenizer.json etc. from the fixture, with the vocabulary padded to 32064 ids and
    <image>/<pad> moved to 32000/32001 (the fixture's BPE merges and byte fallback unchanged)."""
    tok = json.load(open(os.path.join(FIXTURE, "tokenizer.json")))
    vocab = tok["model"]["vocab"]
    moved = {"<image>": IMAGE_ID, "<pad>": PAD_ID}
    used = set(vocab.values())
    for i in range(VOCAB):
        if i not in used and i not in moved.values():
            vocab[f"<extra_{i}>"] = i
    # In the model's vocabulary too: tokenizers gives an added token the id the vocabulary has
    # for it, else the next free one (which would not be 32000).
    vocab.update(moved)
    for t in tok["added_tokens"]:
        if t["content"] in moved:
            t["id"] = moved[t["content"]]
    assert max(vocab.values()) == VOCAB - 1, max(vocab.values())
    with open(os.path.join(model_dir, "tokenizer.json"), "w") as f:
        json.dump(tok, f, ensure_ascii=False)
    cfg = json.load(open(os.path.join(FIXTURE, "tokenizer_config.json")))
    cfg["added_tokens_decoder"] = {
        str(moved.get(v["content"], int(k))): v for k, v in cfg["added_tokens_decoder"].items()
    }
    cfg["model_max_length"] = 4096
    with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    pre = json.load(open(os.path.join(FIXTURE, "preprocessor_config.json")))
    pre["crop_size"] = {"height": 336, "width": 336}
    pre["size"] = {"shortest_edge": 336}
    with open(os.path.join(model_dir, "preprocessor_config.json"), "w") as f:
        json.dump(pre, f, indent=1)


def prompt_ids(model_dir):
    """The LLaVA-1.5 prompt's ids with <image> expanded to 576 (what our engine builds)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    ids = tok.encode(f"USER: <image>\n{QUESTION} ASSISTANT:").ids
    assert ids.count(IMAGE_ID) == 1, ids
    i = ids.index(IMAGE_ID)
    return ids[:i] + [IMAGE_ID] * 576 + ids[i + 1 :]


def build(args, st):
    import numpy as np
    import torch
    from PIL import Image
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    st["versions"] = {"torch": torch.__version__, "transformers": __import__("transformers").__version__}
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )
    text = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=VOCAB, max_position_embeddings=4096, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=PAD_ID, tie_word_embeddings=False,
    )
    cfg = LlavaConfig(vision_config=vision, text_config=text, pad_token_id=PAD_ID)
    # transformers 4.x spells it image_token_index, 5.x image_token_id; LLaVA-1.5's is 32000.
    for key in ("image_token_index", "image_token_id"):
        if hasattr(cfg, key):
            setattr(cfg, key, IMAGE_ID)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlavaForConditionalGeneration(cfg)
    torch.set_default_dtype(torch.float32)
    model = model.to(torch.bfloat16).eval()
    st["parameters"] = sum(p.numel() for p in model.parameters())
    os.makedirs(args.model_dir, exist_ok=True)
    model.save_pretrained(args.model_dir)
    tokenizer_files(args.model_dir)
    # A 336x336 image (resize and crop are then identities), pixel values by hand.
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:336, 0:336]
    img = np.stack([xx * 255 // 335, yy * 255 // 335, (xx + yy) * 255 // 670], -1).astype(np.float64)
    img[60:200, 40:180] = [210, 40, 35]
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    png = os.path.join(args.model_dir, "bench.png")
    Image.fromarray(img, "RGB").save(png)
    pix = (img.astype(np.float32) / 255.0 - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    pixel_values = torch.from_numpy(pix.transpose(2, 0, 1).copy())[None]
    return model, pixel_values, png


def time_hf(args, st, model, pixel_values):
    import torch

    ids = prompt_ids(args.model_dir)
    st["prompt_tokens"] = len(ids)
    inputs = {
        "input_ids": torch.tensor([ids], device="cuda"),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device="cuda"),
        "pixel_values": pixel_values.to("cuda", torch.bfloat16),
    }
    n = args.new_tokens

    def gen(tokens):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=PAD_ID
            )
        torch.cuda.synchronize()
        assert out.shape[1] - len(ids) == tokens, out.shape
        return time.perf_counter() - t

    impl = getattr(model.config, "_attn_implementation", None)
    st["attn_implementation"] = impl
    gen(2)  # warm-up
    ttft = statistics.median(gen(1) for _ in range(3))
    full = statistics.median(gen(n + 1) for _ in range(2))
    st["ttft_ms"] = round(ttft * 1e3, 1)
    st["decode_tok_s"] = round(n / (full - ttft), 2)
    st["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return st


def run_ours(args, label, extra, png, limit):
    timings = os.path.join(args.out, f"fineprune-{label}.json")
    cmd = [
        args.bin, "generate", "--device", "cuda", "--model", args.model_dir, "--image", png,
        "--prompt", QUESTION, "--max-new-tokens", str(args.new_tokens + 1), "--ignore-eos",
        "--warmup", "--timings", timings,
    ] + extra
    print("$ " + " ".join(cmd), flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    print(p.stdout[-2000:], p.stderr[-3000:], sep="\n", flush=True)
    if p.returncode != 0:
        raise RuntimeError(f"exit {p.returncode}: {p.stderr.strip()[-300:]}")
    t = json.load(open(timings))
    t["decode_tok_s"] = round((t["new_tokens"] - 1) / t["decode_secs"], 2) if t["decode_secs"] > 0 else None
    t["first_token_ms"] = round(t["first_token_secs"] * 1e3, 1)
    t["prefill_ms"] = round(t["prefill_secs"] * 1e3, 1)
    return t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default="gpu-bin/fineprune", help="the fineprune executable")
    ap.add_argument("--model-dir", default="/tmp/llava7b")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the JSON results")
    ap.add_argument("--results", help="TSV file to append metric and phase rows to")
    ap.add_argument("--deadline", type=float, help="seconds from start after which phases are skipped")
    ap.add_argument("--layers", type=int, default=32, help="LLaMA layers (32 for 7B)")
    ap.add_argument("--new-tokens", type=int, default=64, help="decode steps timed")
    ap.add_argument("--run-timeout", type=float, default=150, help="seconds per fineprune run")
    args = ap.parse_args()
    b = Bench(args)
    b.out["config"] = {"layers": args.layers, "new_tokens": args.new_tokens, "question": QUESTION}
    built = b.phase("build_7b", 90, lambda: build(args, b.out["hf"]))
    if built is not None:
        model, pixel_values, png = built
        b.phase("hf_sdpa_bf16", 45, lambda: time_hf(args, b.out["hf"], model, pixel_values))
        del model
        gc.collect()
        try:
            import torch

            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - only frees memory
            pass
        for key in ("ttft_ms", "decode_tok_s", "prompt_tokens"):
            if key in b.out["hf"]:
                b.metric(f"hf.{key}", b.out["hf"][key])
        for label, extra in [
            ("unpruned", []),
            ("fastv_keep0.5", ["--prune-layer", "2", "--keep", "0.5"]),
            ("fastv_keep0.25", ["--prune-layer", "2", "--keep", "0.25"]),
        ]:
            t = b.phase(f"fineprune_{label}", 60, lambda: run_ours(args, label, extra, png, min(args.run_timeout, b.left() - 5)))
            if t is not None:
                b.out["fineprune"][label] = t
                for key in ("first_token_ms", "prefill_ms", "decode_tok_s", "load_secs", "image_tokens_kept"):
                    b.metric(f"fineprune.{label}.{key}", t.get(key))
    b.save()
    failed = [k for k, v in b.out["phases"].items() if v["status"] != "pass"]
    print(f"wrote {b.json_path}; phases not passed: {failed or 'none'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
