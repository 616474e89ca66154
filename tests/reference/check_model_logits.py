#!/usr/bin/env python3
"""Checks a checkpoint folder in HF transformers against fineprune's logits for one prompt.

  cargo run --release --bin fineprune -- logits --model DIR --image IMG --prompt "..." --out /tmp/l.safetensors
  /tmp/venv-ref/bin/python tests/reference/check_model_logits.py DIR IMG /tmp/l.safetensors

Loads DIR with LlavaForConditionalGeneration (reporting missing/unexpected keys), preprocesses IMG
with the folder's CLIPImageProcessor, runs the `input_ids` fineprune wrote and prints the max-abs
difference of every position's logits (tolerance 1e-4) and whether the greedy next tokens agree.
Used for the bundled model `models/shapes-llava` (not run in CI: no Python there).
"""
import sys

import torch
import transformers
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPImageProcessor, LlavaForConditionalGeneration

assert transformers.__version__ == "5.23.0", transformers.__version__
TOL = 1e-4


def main(model_dir, image, logits_file):
    ours = load_file(logits_file)
    model, info = LlavaForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, output_loading_info=True)
    model.eval()
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(k), f"{k} = {info[k]}"
    proc = CLIPImageProcessor.from_pretrained(model_dir)
    pv = proc(images=Image.open(image), return_tensors="pt")["pixel_values"]
    ids = ours["input_ids"].long()
    with torch.no_grad():
        got = model(input_ids=ids[None], pixel_values=pv).logits[0].float()
    want = ours["logits"].float()
    diff = (got - want).abs().max().item()
    same = bool((got.argmax(-1) == want.argmax(-1)).all())
    print(f"{model_dir}: {ids.numel()} positions, logits max-abs diff {diff:.2e}, "
          f"greedy tokens identical: {same}")
    assert diff < TOL, diff


if __name__ == "__main__":
    main(*sys.argv[1:4])
