#!/usr/bin/env python3
"""Reference loss and parameter gradients of a LLaVA training step, for tests/train_grads.rs.

For each tiny fixture (llava_gqa: GQA, untied head, feature layer -2, `default`; llava_tied: MHA,
tied embeddings, feature layers [-3, -1], `full`) loads LlavaForConditionalGeneration as float32,
builds a batch of two sequences (the fixture's two prompts, each followed by a short answer, each
with its own image: the fixture's pixel_values and a flipped, scaled copy), labels = -100 except on
answer tokens, and computes the loss as F.cross_entropy with the usual shift (position t predicts
token t+1) on the concatenation of both sequences (mean over answer tokens of the whole batch).
Sequences run one at a time (no padding), their summed token losses divided by the total count.
Writes tests/reference/{fixture}_grads.safetensors:
  input_ids.{0,1} (i64), labels.{0,1} (i64), pixel_values.{0,1} (f32 [3, s, s]), loss (f32 [1]),
  grad.{name} (f32) for EVERY parameter of model.named_parameters() (zeros where torch has no
  gradient: vision layers deeper than the selected features, post_layernorm).
Run:  /tmp/venv-ref/bin/python tests/reference/gen_train_grads.py   (pins: requirements.txt)
"""
import os

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration

assert torch.__version__.split("+")[0] == "2.15.0", torch.__version__
assert transformers.__version__ == "5.23.0", transformers.__version__

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)

ANSWERS = [[300, 45, 120, 77, 2], [88, 412, 99, 2]]


def main(name):
    model = LlavaForConditionalGeneration.from_pretrained(os.path.join(HERE, name), dtype=torch.float32)
    model.train()  # no dropout in these configs
    ref = load_file(os.path.join(HERE, f"{name}_ref.safetensors"))
    px = ref["pixel_values"][0]
    pixels = [px, px.flip(-1) * 0.8 + 0.1]
    out = {}
    seqs = []
    for i, (ids, ans) in enumerate(zip([ref["input_ids"], ref["input_ids_2"]], ANSWERS)):
        ids = torch.cat([ids, torch.tensor(ans, dtype=torch.int64)])
        labels = torch.full_like(ids, -100)
        labels[-len(ans):] = ids[-len(ans):]
        seqs.append((ids, labels, pixels[i]))
        out[f"input_ids.{i}"] = ids.clone()
        out[f"labels.{i}"] = labels.clone()
        out[f"pixel_values.{i}"] = pixels[i].clone().contiguous()
    model.zero_grad()
    total = torch.zeros(())
    count = 0
    for ids, labels, pv in seqs:
        logits = model(input_ids=ids[None], pixel_values=pv[None]).logits[0]
        total = total + F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")
        count += int((labels[1:] != -100).sum())
    loss = total / count
    loss.backward()
    out["loss"] = loss.detach().reshape(1)
    for n, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        out[f"grad.{n}"] = g.detach().float().contiguous()
    save_file(out, os.path.join(HERE, f"{name}_grads.safetensors"))
    print(name, "loss", loss.item(), "count", count)


if __name__ == "__main__":
    for n in ["llava_gqa", "llava_tied"]:
        main(n)
