#!/usr/bin/env python3
"""Reference losses and gradients of a whole distillation objective, for tests/distill_kd.rs.

Teacher: the llava_gqa fixture (LlavaForConditionalGeneration, float32, eager attention so the
attention probabilities are outputs). Student: the same checkpoint with every parameter moved by
    delta[j] = 0.05 * sin(0.37 * j + 1.3 * k)      (float64, then added in float32)
where j is the flat index into the tensor and k = (sum of the parameter name's UTF-8 bytes) % 97.
Batch: the two sequences of llava_gqa_grads.safetensors (gen_train_grads.py), run one at a time.

Every loss below is transcribed from its specification in src/train/distill.rs's doc comments
(not from the Rust code); teacher quantities are detached. Group of position t: image if its id
is the image token, answer if labels[t] >= 0, text otherwise.
  ce          LLaVA's cross-entropy (mean over answer tokens of the batch), weight 0.5
  kd          generalised JSD, beta 0.3, T 1.5, on "all" rows (row t with t+1 < n and token t+1
              not an image token): mixture log m = logsumexp(log p + ln beta, log q + ln(1-beta)),
              J = beta KL(p||m) + (1-beta) KL(q||m), row loss T^2 J / (beta (1-beta)); mean over
              rows of the batch; weight 2
  hidden      pairs (student 1, teacher 2), (2, 2); per pair a projector Linear(64,64)-GELU(erf)-
              Linear(64,64) (torch default init, seed 0, saved); per sample b and pair p
              L_bp = mean over rows and dims (P_p(h_s) - h_t)^2 over every row; mean over samples
              of sum_p L_bp / 2; weight 0.7. States are the decoder layers' outputs (before the
              final norm), taken with forward hooks.
  attention   blocks answer->image and text->text, pairs (0, 1) and (2, 2) (4 heads both sides:
              head h matches head h); per block and pair: mean over (head, query i, key j <= i) of
              the batch of (P_s - P_t)^2; mean over blocks and pairs; weight 300
  affinity    pair (1, 2), text "all" (every non-image row): mean over (image row i, text row j)
              pairs of each sequence, over the batch, of (cos_s(h_i, h_j) - cos_t(h_i, h_j))^2;
              weight 20
  relational  pair (2, 2), tokens "all": per sample the mean of its rows' states, normalised,
              e_b; G = [e_a . e_b] (2 x 2); mean of (G_s - G_t)^2; weight 20
  vision      the projector's outputs (image features the LM reads): mean over every element of
              both images of (f_s - f_t)^2; weight 3
Writes tests/reference/llava_gqa_distill_grads.safetensors:
  {ce,kd,hidden,attention,affinity,relational,vision} (f32 [1]); align.{0,1}.linear_{1,2}.{weight,
  bias} (the projectors' initial values); grad.{name} for every student parameter (zeros where
  torch has none) and every projector parameter.
Run:  /tmp/venv-ref/bin/python tests/reference/gen_distill_grads.py   (pins: requirements.txt;
byte-identical on re-run, a few seconds)
"""
import math
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

W = dict(ce=0.5, kd=2.0, hidden=0.7, attention=300.0, affinity=20.0, relational=20.0, vision=3.0)
BETA, T = 0.3, 1.5
HIDDEN_PAIRS = [(1, 2), (2, 2)]
ATTN_PAIRS = [(0, 1), (2, 2)]
BLOCKS = [("answer", "image"), ("text", "text")]
AFFINITY_PAIRS = [(1, 2)]
RELATIONAL_PAIRS = [(2, 2)]


def load(perturb):
    m = LlavaForConditionalGeneration.from_pretrained(
        os.path.join(HERE, "llava_gqa"), dtype=torch.float32, attn_implementation="eager"
    )
    m.train()  # no dropout in this config
    if perturb:
        with torch.no_grad():
            for name, p in m.named_parameters():
                k = sum(name.encode()) % 97
                j = torch.arange(p.numel(), dtype=torch.float64)
                p.add_((0.05 * torch.sin(0.37 * j + 1.3 * k)).float().reshape(p.shape))
    return m


def run(model, ids, pv):
    """Logits [t, V], decoder layer outputs [t, d] each, attention [H, t, t] each, features."""
    layers = model.model.language_model.layers
    outs, feats = {}, {}

    def keep(i):
        def hook(_mod, _inp, out):
            outs[i] = (out[0] if isinstance(out, tuple) else out)[0]
        return hook

    hooks = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
    hooks.append(
        model.model.multi_modal_projector.register_forward_hook(
            lambda _m, _i, out: feats.__setitem__("v", out.reshape(-1, out.shape[-1]))
        )
    )
    out = model(input_ids=ids[None], pixel_values=pv[None], output_attentions=True)
    for h in hooks:
        h.remove()
    states = [outs[i] for i in range(len(layers))]
    return out.logits[0], states, [a[0] for a in out.attentions], feats["v"]


def group(ids, labels, t, image):
    if ids[t] == image:
        return "image"
    return "answer" if labels[t] >= 0 else "text"


def main():
    teacher, student = load(False), load(True)
    image = teacher.config.image_token_id
    ref = load_file(os.path.join(HERE, "llava_gqa_grads.safetensors"))
    seqs = [(ref[f"input_ids.{i}"], ref[f"labels.{i}"], ref[f"pixel_values.{i}"]) for i in range(2)]
    torch.manual_seed(0)
    d = student.config.text_config.hidden_size
    projectors = [torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.GELU(), torch.nn.Linear(d, d))
                  for _ in HIDDEN_PAIRS]
    out = {}
    for i, p in enumerate(projectors):
        for k, lin in [("linear_1", p[0]), ("linear_2", p[2])]:
            out[f"align.{i}.{k}.weight"] = lin.weight.detach().clone().contiguous()
            out[f"align.{i}.{k}.bias"] = lin.bias.detach().clone().contiguous()

    with torch.no_grad():
        tr = [run(teacher, ids, pv) for ids, _, pv in seqs]
    st = [run(student, ids, pv) for ids, _, pv in seqs]

    # Cross-entropy.
    ce_sum, ce_n = 0.0, 0
    for (ids, labels, _), (z, _, _, _) in zip(seqs, st):
        ce_sum = ce_sum + F.cross_entropy(z[:-1], labels[1:], ignore_index=-100, reduction="sum")
        ce_n += int((labels[1:] != -100).sum())
    ce = ce_sum / ce_n

    # Generalised JSD on "all" rows.
    rows = []
    for (ids, _, _), (zs, _, _, _), (zt, _, _, _) in zip(seqs, st, tr):
        n = len(ids)
        keep = [t for t in range(n - 1) if ids[t + 1] != image]
        log_q = F.log_softmax(zs[keep].double() / T, dim=-1)
        log_p = F.log_softmax(zt[keep].double() / T, dim=-1)
        log_m = torch.logsumexp(torch.stack([log_p + math.log(BETA), log_q + math.log(1 - BETA)]), dim=0)
        kl_p = (log_p.exp() * (log_p - log_m)).sum(-1)
        kl_q = (log_q.exp() * (log_q - log_m)).sum(-1)
        rows.append(T * T * (BETA * kl_p + (1 - BETA) * kl_q) / (BETA * (1 - BETA)))
    kd = torch.cat(rows).mean()

    # Hidden alignment.
    per_sample = []
    for (_, hs, _, _), (_, ht, _, _) in zip(st, tr):
        per_sample.append(sum(((proj(hs[a]) - ht[b]) ** 2).mean() for proj, (a, b) in
                              zip(projectors, HIDDEN_PAIRS)) / len(HIDDEN_PAIRS))
    hidden = sum(per_sample) / len(per_sample)

    # Attention alignment.
    terms = []
    for a, b in ATTN_PAIRS:
        for gq, gk in BLOCKS:
            sq, n = 0.0, 0
            for (ids, labels, _), (_, _, ps, _), (_, _, pt, _) in zip(seqs, st, tr):
                t = len(ids)
                g = [group(ids, labels, i, image) for i in range(t)]
                mask = torch.zeros(t, t, dtype=torch.bool)
                for i in range(t):
                    for j in range(i + 1):
                        mask[i, j] = g[i] == gq and g[j] == gk
                diff = (ps[a].double() - pt[b].double())[:, mask]
                sq = sq + (diff ** 2).sum()
                n += diff.numel()
            terms.append(sq / n if n else torch.zeros((), dtype=torch.float64))
    attention = sum(terms) / len(terms)

    # Affinity.
    def cosines(h, img, txt):
        u = F.normalize(h.double(), dim=-1, eps=1e-8)
        return u[img] @ u[txt].T

    aff = []
    for a, b in AFFINITY_PAIRS:
        sq, n = 0.0, 0
        for (ids, _, _), (_, hs, _, _), (_, ht, _, _) in zip(seqs, st, tr):
            img = [t for t in range(len(ids)) if ids[t] == image]
            txt = [t for t in range(len(ids)) if ids[t] != image]
            diff = cosines(hs[a], img, txt) - cosines(ht[b], img, txt)
            sq = sq + (diff ** 2).sum()
            n += diff.numel()
        aff.append(sq / n)
    affinity = sum(aff) / len(aff)

    # Relational.
    rel = []
    for a, b in RELATIONAL_PAIRS:
        es = F.normalize(torch.stack([h[a].double().mean(0) for _, h, _, _ in st]), dim=-1, eps=1e-8)
        et = F.normalize(torch.stack([h[b].double().mean(0) for _, h, _, _ in tr]), dim=-1, eps=1e-8)
        rel.append(((es @ es.T - et @ et.T) ** 2).mean())
    relational = sum(rel) / len(rel)

    # Vision features.
    fs = torch.cat([f for _, _, _, f in st])
    ft = torch.cat([f for _, _, _, f in tr])
    vision = ((fs.double() - ft.double()) ** 2).mean()

    losses = dict(ce=ce, kd=kd, hidden=hidden, attention=attention, affinity=affinity,
                  relational=relational, vision=vision)
    total = sum(W[k] * v for k, v in losses.items())
    total.backward()
    for k, v in losses.items():
        out[k] = v.detach().float().reshape(1)
        print(f"{k} {v.item():.8g}")
    for name, p in student.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        out[f"grad.{name}"] = g.detach().float().contiguous()
    for i, proj in enumerate(projectors):
        for k, lin in [("linear_1", proj[0]), ("linear_2", proj[2])]:
            out[f"grad.align.{i}.{k}.weight"] = lin.weight.grad.detach().float().contiguous()
            out[f"grad.align.{i}.{k}.bias"] = lin.bias.grad.detach().float().contiguous()
    save_file(out, os.path.join(HERE, "llava_gqa_distill_grads.safetensors"))


if __name__ == "__main__":
    main()
