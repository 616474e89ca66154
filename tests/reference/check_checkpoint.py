#!/usr/bin/env python3
"""Checks that transformers 5.23 loads a checkpoint written by `fineprune::train::checkpoint::save_checkpoint`.

For each saved directory given as `FIXTURE=DIR` (e.g. `llava_gqa=/tmp/fineprune-ckpt-llava_gqa-123`):
  * LlavaForConditionalGeneration.from_pretrained(DIR, output_loading_info=True) reports no missing,
    unexpected or mismatched keys and no error messages;
  * every tensor of model.safetensors is float32;
  * the logits of both fixture prompts (tests/reference/{fixture}_ref.safetensors input_ids,
    input_ids_2, pixel_values) match the reference `logits` / `logits_2` within 1e-4 (max-abs).
Produce the directories with
  FINEPRUNE_KEEP_CKPT=1 cargo test --release --test checkpoint -- --nocapture
(the test prints the kept paths), then run
  /tmp/venv-ref/bin/python tests/reference/check_checkpoint.py llava_gqa=DIR1 llava_tied=DIR2
Not run in CI (no Python there); the result is recorded in tests/reference/README.md.
"""
import os
import sys

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration

assert torch.__version__.split("+")[0] == "2.15.0", torch.__version__
assert transformers.__version__ == "5.23.0", transformers.__version__

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-4


def check(name, path):
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        n = len(list(f.keys()))
    assert dtypes == {"F32"}, dtypes
    model, info = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    model.eval()
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(k), f"{name}: {k} = {info[k]}"
    ref = load_file(os.path.join(HERE, f"{name}_ref.safetensors"))
    pv = ref["pixel_values"]
    worst = 0.0
    with torch.no_grad():
        for ids, want in [(ref["input_ids"], ref["logits"]), (ref["input_ids_2"], ref["logits_2"])]:
            got = model(input_ids=ids[None], pixel_values=pv).logits[0].float()
            worst = max(worst, (got - want).abs().max().item())
    print(f"{name}: {n} tensors, all F32, no missing/unexpected/mismatched keys, "
          f"tied={model.config.text_config.tie_word_embeddings}, logits max-abs diff {worst:.2e}")
    assert worst < TOL, worst


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args:
        sys.exit(__doc__)
    for a in args:
        name, path = a.split("=", 1)
        check(name, path)
    print("OK")
