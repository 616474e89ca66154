"""Reference for src/ops/kd.rs: logit-distillation losses and their gradients w.r.t. the student logits.

Run: /tmp/venv-ref/bin/python tests/reference/gen_kd_losses.py   (torch 2.15.0 only, CPU, under a
second, byte-identical on re-run). Checked by tests/kd_losses.rs.

Random student/teacher logits (ROWS x V, f32, scale ~6; the teacher partly agrees with the student;
one row is scaled x2.5 so its softmax is very peaked), then for each config the loss (mean over rows)
and its gradient via torch autograd, computed in float64 from the f32 inputs:
  forward_kl  F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * T**2
  reverse_kl  F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * T**2
  jsd(beta)   TRL's generalized_jsd_loss (mixture log m = logsumexp(stack[log_q + log(1-beta),
              log_p + log(beta)]); beta*kl_div(m, log_p) + (1-beta)*kl_div(m, log_q); beta 0 / 1 are
              its forward / reverse KL special cases), divided by beta*(1-beta), times T**2
  mse         F.mse_loss(s_student, s_teacher) (mean over all elements = mean over rows of row means)
with log_q = log_softmax(s(student)/T), log_p = log_softmax(s(teacher)/T), s = Sun et al.'s
`normalize` (CVPR 2024, unbiased torch.std) when standardize, else the identity. T is the f32 value
(e.g. 0.699999988...) so the Rust side, which holds T as f32, uses exactly the same number.

Writes tests/reference/kd_losses_ref.safetensors:
  student, teacher       F32 [ROWS, V]
  {name}.loss            F64 [1]
  {name}.grad            F64 [ROWS, V]   d loss / d student
and tests/reference/kd_losses_ref.json: torch version, shapes, and per config its name, divergence
(in the serde form of ops::kd::Divergence), temperature, standardize and loss.
"""
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

assert torch.__version__.startswith("2.15.0"), torch.__version__

ROWS, V = 5, 37


def normalize(logit):
    # Sun et al., "Logit Standardization in Knowledge Distillation" (CVPR 2024), official code.
    mean = logit.mean(dim=-1, keepdims=True)
    stdv = logit.std(dim=-1, keepdims=True)
    return (logit - mean) / (1e-7 + stdv)


def kl(inp, target):
    return F.kl_div(inp, target, reduction="batchmean", log_target=True)


def jsd(log_q, log_p, beta):
    # TRL GKDTrainer.generalized_jsd_loss (student = q, teacher = p), then / (beta (1 - beta)).
    if beta == 0:
        return kl(log_q, log_p)
    if beta == 1:
        return kl(log_p, log_q)
    b = torch.tensor(beta, dtype=log_q.dtype)
    mix = torch.logsumexp(torch.stack([log_q + torch.log(1 - b), log_p + torch.log(b)]), dim=0)
    return (b * kl(mix, log_p) + (1 - b) * kl(mix, log_q)) / (b * (1 - b))


def loss_fn(div, temperature, standardize, zs, zt):
    s, t = (normalize(zs), normalize(zt)) if standardize else (zs, zt)
    if div["kind"] == "mse":
        return F.mse_loss(s, t)
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    d = {
        "forward_kl": lambda: kl(log_q, log_p),
        "reverse_kl": lambda: kl(log_p, log_q),
        "jsd": lambda: jsd(log_q, log_p, div.get("beta")),
    }[div["kind"]]()
    return d * temperature**2


FKL, RKL, MSE = {"kind": "forward_kl"}, {"kind": "reverse_kl"}, {"kind": "mse"}


def JSD(beta):
    return {"kind": "jsd", "beta": beta}


CONFIGS = [
    ("fkl_t2", FKL, 2.0, False),
    ("fkl_t07", FKL, 0.7, False),
    ("fkl_t07_std", FKL, 0.7, True),
    ("rkl_t2", RKL, 2.0, False),
    ("rkl_t07_std", RKL, 0.7, True),
    ("jsd05_t2", JSD(0.5), 2.0, False),
    ("jsd05_t07_std", JSD(0.5), 0.7, True),
    ("jsd01_t07", JSD(0.1), 0.7, False),
    ("jsd01_t2_std", JSD(0.1), 2.0, True),
    ("jsd0_t2", JSD(0.0), 2.0, False),
    ("jsd1_t07", JSD(1.0), 0.7, False),
    ("mse", MSE, 1.0, False),
    ("mse_std", MSE, 1.0, True),
]

g = torch.Generator().manual_seed(20241)
student = torch.randn(ROWS, V, generator=g) * 6
teacher = 0.6 * student + torch.randn(ROWS, V, generator=g) * 4
student[3] *= 2.5
student, teacher = student.float().contiguous(), teacher.float().contiguous()

# Sun et al.'s std is the unbiased one: the z-scored rows have unbiased std 1 (up to the 1e-7).
zt = normalize(teacher.double())
assert torch.allclose(zt.std(dim=-1), torch.ones(ROWS, dtype=torch.float64), atol=1e-6)
assert not torch.allclose(zt.std(dim=-1, correction=0), torch.ones(ROWS, dtype=torch.float64), atol=1e-3)

out = {"student": student, "teacher": teacher}
meta = {"torch": torch.__version__, "rows": ROWS, "vocab": V, "configs": []}
for name, div, temp, standardize in CONFIGS:
    t = float(np.float32(temp))
    zs = student.double().requires_grad_(True)
    loss = loss_fn(div, t, standardize, zs, teacher.double())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zs.grad).all(), name
    out[f"{name}.loss"] = loss.detach().reshape(1).clone()
    out[f"{name}.grad"] = zs.grad.detach().clone().contiguous()
    meta["configs"].append(
        {"name": name, "divergence": div, "temperature": t, "standardize": standardize, "loss": loss.item()}
    )
    print(f"{name:14s} loss {loss.item():.6f}  max|grad| {zs.grad.abs().max().item():.4f}")

# Continuity of the scaled JSD at the end points (on these peaked rows it is slow, see kd.rs).
for beta, ref in [(1e-9, "fkl_t2"), (1 - 1e-9, "rkl_t2")]:
    j = loss_fn(JSD(beta), 2.0, False, student.double(), teacher.double()).item()
    r = out[f"{ref}.loss"].item()
    assert abs(j - r) < 1e-3 * abs(r), (beta, j, r)

here = os.path.dirname(os.path.abspath(__file__))
save_file(out, os.path.join(here, "kd_losses_ref.safetensors"))
with open(os.path.join(here, "kd_losses_ref.json"), "w") as f:
    json.dump(meta, f, indent=1)
    f.write("\n")
