#!/usr/bin/env python3
"""Training throughput of PyTorch on the step `benches/train.rs` measures for fineprune.

One optimizer step = forward (loss over the last 4 positions), backward and torch.optim.AdamW on
HF transformers' LlavaForConditionalGeneration built from benches/teacher_config.json (f32,
default attention implementation), batch 8 x 195 tokens (BOS, 30 text, 144 image, 20 text), the
same ids and pixels as the Rust bench. Prints tokens per second (median of --iters steps after
--warmup).

  /tmp/venv-ref/bin/python tests/reference/bench_train.py --threads 2
"""
import argparse
import json
import os
import statistics
import time

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "..", "..", "benches", "teacher_config.json")
BATCH, TEXT_BEFORE, TEXT_AFTER, TRAINED = 8, 30, 20, 4


def batch(cfg):
    text = lambda n, off: [3 + (7 * (i + off)) % 500 for i in range(n)]
    image_tokens = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    ids = [1] + text(TEXT_BEFORE, 0) + [cfg.image_token_id] * image_tokens + text(TEXT_AFTER, TEXT_BEFORE)
    n = len(ids)
    labels = [t if i >= n - TRAINED else -100 for i, t in enumerate(ids)]
    s = cfg.vision_config.image_size
    state, px = 12345, []
    mask = (1 << 64) - 1
    for _ in range(BATCH * 3 * s * s):
        state = (state * 6364136223846793005 + 1) & mask
        px.append((state >> 40) / float(1 << 24) * 4.0 - 2.0)
    pixels = torch.tensor(px, dtype=torch.float32).reshape(BATCH, 3, s, s)
    return torch.tensor([ids] * BATCH), torch.tensor([labels] * BATCH), pixels


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    with open(CONFIG) as f:
        cfg = LlavaConfig(**json.load(f))
    model = LlavaForConditionalGeneration(cfg).float().train()
    ids, labels, pixels = batch(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    tokens = ids.numel()
    times = []
    for i in range(a.warmup + a.iters):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        out = model(input_ids=ids, pixel_values=pixels, labels=labels)
        out.loss.backward()
        opt.step()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"torch {torch.__version__} threads={a.threads} attn={model.config._attn_implementation}: "
          f"{tokens} tokens/step, median {med * 1e3:.1f} ms/step, {tokens / med:.0f} tokens/s")


if __name__ == "__main__":
    main()
