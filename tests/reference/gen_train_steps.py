#!/usr/bin/env python3
"""Ten AdamW training steps of LLaVA in PyTorch, for tests/train_steps.rs.

Loads tests/reference/llava_gqa (float32) and the 2-sequence batch that gen_train_grads.py stored in
llava_gqa_grads.safetensors (input_ids.{0,1}, labels.{0,1}, pixel_values.{0,1}); the loss is the same
(F.cross_entropy of the shifted logits, summed over both sequences' answer tokens, divided by their count).
Optimizer: torch.optim.AdamW(foreach=False), lr 1e-3, betas (0.9, 0.999), eps 1e-8, with our
`optim::decay_group` rule: weight decay 0.01, except 0.0 for names ending in `.bias` or whose last two
components contain `norm`. No schedule, no clipping. Parameters that get no gradient (vision layers
past the feature layer, post_layernorm) have grad None and are skipped by torch, as ours holds none.
Each step: zero_grad, forward (loss recorded BEFORE the update), backward, step. After 10 steps one
more forward gives `final_loss`.
Writes tests/reference/train_steps_ref.json: {"fixture", "lr", "weight_decay", "losses" [10], "final_loss"}.
Run:  /tmp/venv-ref/bin/python tests/reference/gen_train_steps.py   (pins: requirements.txt)
"""
import json
import os

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration

assert torch.__version__.split("+")[0] == "2.15.0", torch.__version__
assert transformers.__version__ == "5.23.0", transformers.__version__

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)

NAME = "llava_gqa"
LR = 1e-3
WD = 0.01
STEPS = 10


def no_decay(name):
    lower = name.lower()
    tail = lower.split(".")[-2:]
    return lower.endswith(".bias") or lower == "bias" or any("norm" in c for c in tail)


def main():
    model = LlavaForConditionalGeneration.from_pretrained(os.path.join(HERE, NAME), dtype=torch.float32)
    model.train()  # no dropout in this config
    r = load_file(os.path.join(HERE, f"{NAME}_grads.safetensors"))
    seqs = [(r[f"input_ids.{i}"], r[f"labels.{i}"], r[f"pixel_values.{i}"]) for i in range(2)]
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if not no_decay(n)], "weight_decay": WD},
        {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.999), eps=1e-8, foreach=False)

    def loss_fn():
        total = torch.zeros(())
        count = 0
        for ids, labels, pv in seqs:
            logits = model(input_ids=ids[None], pixel_values=pv[None]).logits[0]
            total = total + F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")
            count += int((labels[1:] != -100).sum())
        return total / count

    losses = []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        losses.append(loss.item())
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = loss_fn().item()
    out = {"fixture": NAME, "lr": LR, "weight_decay": WD, "losses": losses, "final_loss": final}
    with open(os.path.join(HERE, "train_steps_ref.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
