"""Reference for src/train/optim.rs: torch.optim.AdamW + HF warm-up/cosine LambdaLR + clip_grad_norm_.

Run: /tmp/venv-ref/bin/python tests/reference/gen_adamw.py   (torch 2.15.0, CPU, no transformers
needed: the schedule is transformers' `_get_cosine_schedule_with_warmup_lr_lambda`, copied below.)

Two trainable groups with different lr / weight decay, one frozen group (requires_grad=False),
fixed synthetic gradients, 10 steps. Writes tests/reference/adamw_ref.safetensors:
  init.{name}              parameters before training
  grad.{k}.{name}          gradient fed at step k (before clipping)
  param.{k}.{name}         parameters after step k
  lr.{group}   F64 [10]    lr used at step k
  grad_norm    F32 [10]    total norm returned by clip_grad_norm_ at step k
"""
import math
import os
from functools import partial

import torch
from safetensors.torch import save_file

assert torch.__version__.startswith("2.15.0"), torch.__version__

STEPS, WARMUP, MAX_NORM = 10, 3, 1.0


def cosine_lambda(current_step, *, num_warmup_steps, num_training_steps, num_cycles=0.5):
    # transformers/optimization.py, _get_cosine_schedule_with_warmup_lr_lambda
    if current_step < num_warmup_steps:
        return float(current_step) / float(max(1, num_warmup_steps))
    progress = float(current_step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))


g = torch.Generator().manual_seed(1234)
shapes = {"a.w": (4, 3), "a.norm": (5,), "b.w": (3, 2), "b.bias": (3,), "c.w": (2, 2)}
groups = {"a.w": "decay", "a.norm": "no_decay", "b.w": "decay", "b.bias": "no_decay", "c.w": "frozen"}
params = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
params["c.w"].requires_grad_(False)
for n, p in params.items():
    if n != "c.w":
        p.requires_grad_(True)

out = {f"init.{n}": p.detach().clone() for n, p in params.items()}
opt = torch.optim.AdamW(
    [
        {"params": [params["a.w"], params["b.w"]], "lr": 1e-2, "weight_decay": 0.1},
        {"params": [params["a.norm"], params["b.bias"]], "lr": 3e-2, "weight_decay": 0.0},
        {"params": [params["c.w"]], "lr": 1e-2, "weight_decay": 0.1},
    ],
    betas=(0.9, 0.999),
    eps=1e-8,
    foreach=False,
)
sched = torch.optim.lr_scheduler.LambdaLR(
    opt, partial(cosine_lambda, num_warmup_steps=WARMUP, num_training_steps=STEPS)
)
lrs = {"decay": [], "no_decay": []}
norms = []
trainable = [p for n, p in params.items() if n != "c.w"]
for k in range(STEPS):
    # Alternate large and small gradients so clipping fires on some steps and not others.
    scale = 2.0 if k % 2 == 0 else 0.05
    for n, p in params.items():
        grad = torch.randn(p.shape, generator=g) * scale
        out[f"grad.{k}.{n}"] = grad.clone()
        if n != "c.w":
            p.grad = grad
    norms.append(torch.nn.utils.clip_grad_norm_(trainable, MAX_NORM).item())
    lrs["decay"].append(opt.param_groups[0]["lr"])
    lrs["no_decay"].append(opt.param_groups[1]["lr"])
    opt.step()
    sched.step()
    for n, p in params.items():
        out[f"param.{k}.{n}"] = p.detach().clone()

out["lr.decay"] = torch.tensor(lrs["decay"], dtype=torch.float64)
out["lr.no_decay"] = torch.tensor(lrs["no_decay"], dtype=torch.float64)
out["grad_norm"] = torch.tensor(norms, dtype=torch.float32)
out = {k: v.contiguous() for k, v in out.items()}
here = os.path.dirname(os.path.abspath(__file__))
save_file(out, os.path.join(here, "adamw_ref.safetensors"))
print("norms", norms)
print("lrs", lrs)
