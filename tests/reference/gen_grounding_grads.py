#!/usr/bin/env python3
"""Reference attention-grounding loss and parameter gradients, for tests/train_grads.rs.

On the llava_gqa fixture and the batch of gen_train_grads.py (read back from
llava_gqa_grads.safetensors), with HF's eager attention (output_attentions gives the softmax
probabilities): each sequence's second-to-last row is grounded on its image tokens 0, 3, 4, 10 at
decoder layer 1, and the objective is

  CE + WEIGHT * G,  G = mean over rows of -ln( mean over heads of sum_j P_h[row, image_slot_j] ),

the cross-entropy as in gen_train_grads.py. Writes tests/reference/llava_gqa_ground_grads.safetensors:
  ce (f32 [1]), ground (f32 [1], G unweighted), grad.{name} (f32) of the objective for every
  parameter (zeros where torch has none).
Run:  /tmp/venv-ref/bin/python tests/reference/gen_grounding_grads.py   (pins: requirements.txt)
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

NAME = "llava_gqa"
LAYER = 1
WEIGHT = 0.7
PATCHES = [0, 3, 4, 10]


def main():
    model = LlavaForConditionalGeneration.from_pretrained(
        os.path.join(HERE, NAME), dtype=torch.float32, attn_implementation="eager")
    model.train()  # no dropout in this config
    batch = load_file(os.path.join(HERE, f"{NAME}_grads.safetensors"))
    image_token = model.config.image_token_id
    model.zero_grad()
    total, count, ground, rows = torch.zeros(()), 0, torch.zeros(()), 0
    for i in range(2):
        ids, labels, pv = batch[f"input_ids.{i}"], batch[f"labels.{i}"], batch[f"pixel_values.{i}"]
        out = model(input_ids=ids[None], pixel_values=pv[None], output_attentions=True)
        total = total + F.cross_entropy(out.logits[0][:-1], labels[1:], ignore_index=-100, reduction="sum")
        count += int((labels[1:] != -100).sum())
        slots = (ids == image_token).nonzero().flatten()[PATCHES]
        row = len(ids) - 2
        probs = out.attentions[LAYER][0]  # [heads, t, t]
        mass = probs[:, row, slots].sum(-1).mean()
        ground = ground - torch.log(mass)
        rows += 1
    ce = total / count
    g = ground / rows
    (ce + WEIGHT * g).backward()
    res = {"ce": ce.detach().reshape(1), "ground": g.detach().reshape(1)}
    for n, p in model.named_parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        res[f"grad.{n}"] = grad.detach().float().contiguous()
    save_file(res, os.path.join(HERE, f"{NAME}_ground_grads.safetensors"))
    print(NAME, "ce", ce.item(), "ground", g.item())


if __name__ == "__main__":
    main()
