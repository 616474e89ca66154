#!/usr/bin/env python3
"""FastV-style visual token pruning reference on the tiny LLaVA fixtures (HF transformers, eager, f32).

Reads (written by gen_llava.py): llava_gqa/, llava_tied/, llava_{gqa,tied}_ref.safetensors
                                 (input_ids, input_ids_2, pixel_values, logits, greedy_ids).
Writes: fastv_ref.safetensors, fastv_ref.json (both under tests/reference/).

Contract: /work/shared/PRUNING.md (single stage, query strategy `last_token`, head strategy `sum`).
For a plan (K, keep, renumber):
  * merge image features into inputs_embeds exactly as HF LlavaModel.forward does;
  * layers 0..K-1 run on the full sequence, position ids 0..L-1, causal mask;
  * layer K-1's eager attention probabilities A [H, L, L] (after softmax): importance of image token j
    = mean over heads of A[h, L-1, V_j]  (mean = sum(...)/H, in f32);
  * keep count = ceil(keep * N) for a fraction, or the count itself for an int;
    kept = first k of a stable sort on (-score, index), then ascending;
  * the pruned sequence = non-image positions + kept image positions, original order;
  * layers K.. run on it with the ORIGINAL position ids of the survivors (renumber=True: 0..L'-1),
    causal mask over the pruned sequence; final RMSNorm + lm_head -> logits [L', vocab].
Greedy (24 tokens, EOS ignored): each step is a FULL RECOMPUTE without KV cache of prompt + generated;
the dropped image positions are fixed by the prefill ranking (never re-ranked); layers < K see everything
(positions 0..), layers >= K see the rest (original positions, or index in the pruned sequence for renumber).

Everything is done by calling HF's own modules (embed_tokens, get_image_features, decoder layers,
rotary_emb, norm, lm_head); an independent plain-torch re-implementation cross-checks it.

Run:  /tmp/venv-ref/bin/python tests/reference/gen_fastv.py     (a few seconds; deterministic)
"""
import json
import math
import os
import sys
from fractions import Fraction

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlavaForConditionalGeneration
from transformers.masking_utils import create_causal_mask

assert torch.__version__.split("+")[0] == "2.15.0", torch.__version__
assert transformers.__version__ == "5.23.0", transformers.__version__

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from gen_llava import load_dir_weights, manual_cfg, rope_rotate_half  # noqa: E402  (independent check)

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)

N_GREEDY = 24
FIXTURES = ["llava_gqa", "llava_tied"]
# name -> (prompt index, K, keep (float = fraction, int = absolute count), renumber)
CASES = [
    ("fastv_p1", 1, 2, 0.5, False),
    ("fastv_p2", 2, 2, 0.5, False),
    ("k1_keep025", 1, 1, 0.25, False),
    ("renumber", 1, 2, 0.5, True),
    ("abs5", 1, 2, 5, False),
    ("keep1", 1, 2, 1.0, False),
]


def maxdiff(a, b):
    return float((a.float() - b.float()).abs().max())


def keep_count(keep, n):
    if isinstance(keep, int):
        assert 0 <= keep <= n
        return keep
    return min(n, math.ceil(Fraction(str(keep)) * n))  # exact: no float rounding in the ceil


def rank(scores):
    """Indices sorted by (-score, index): stable, ties -> lower index."""
    s = scores.tolist()
    return sorted(range(len(s)), key=lambda i: (-s[i], i))


class HFRunner:
    """Runs the LLaVA language model layer by layer with HF's own modules."""

    def __init__(self, model):
        self.model = model
        self.lm = model.model.language_model
        self.cfg = self.lm.config
        assert self.cfg._attn_implementation == "eager", self.cfg._attn_implementation
        self.image_token_id = model.config.image_token_id

    @torch.no_grad()
    def embeds(self, ids, pixel_values):
        """HF LlavaModel.forward's merge, verbatim."""
        m = self.model.model
        inputs_embeds = m.get_input_embeddings()(ids[None])
        feats = m.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
        feats = torch.cat(feats, dim=0).to(inputs_embeds.dtype)
        mask = m.get_placeholder_mask(ids[None], inputs_embeds=inputs_embeds, image_features=feats)
        return inputs_embeds.masked_scatter(mask, feats)

    def causal_mask(self, h):
        # NOTE: position_ids passed here must be 0..n-1. With gapped (original) position ids and no
        # attention_mask, create_causal_mask treats every jump != 1 as a packed-sequence boundary
        # (masking_utils.find_packed_sequence_indices) and blocks attention across it.
        n = h.shape[1]
        m = create_causal_mask(config=self.cfg, inputs_embeds=h, attention_mask=None, past_key_values=None,
                               position_ids=torch.arange(n)[None])
        assert m is not None and m.shape == (1, 1, n, n), None if m is None else m.shape
        allowed = m[0, 0] == 0
        assert torch.equal(allowed, torch.ones(n, n, dtype=torch.bool).tril()), "mask is not plain causal"
        return m

    def layer(self, i, h, pos):
        """One decoder layer; returns (hidden, eager attention probabilities [1,H,n,n])."""
        got = {}
        attn = self.lm.layers[i].self_attn
        hook = attn.register_forward_hook(lambda mod, args, out: got.__setitem__("w", out[1]))
        try:
            pos = pos[None]
            out = self.lm.layers[i](h, attention_mask=self.causal_mask(h), position_ids=pos,
                                    position_embeddings=self.lm.rotary_emb(h, position_ids=pos))
        finally:
            hook.remove()
        assert isinstance(out, torch.Tensor), type(out)  # 5.x layers return a bare tensor
        return out, got["w"]

    @torch.no_grad()
    def run(self, emb, K, drop, renumber):
        """emb [1,L,D]; drop = absolute positions removed before layer K. Returns logits, attn K-1, pos."""
        L = emb.shape[1]
        h, pos = emb, torch.arange(L)
        attn = None
        for i in range(K):
            h, attn = self.layer(i, h, pos)
        keep_pos = torch.tensor([p for p in range(L) if p not in set(drop)], dtype=torch.long)
        h = h[:, keep_pos]
        pos = torch.arange(len(keep_pos)) if renumber else keep_pos
        for i in range(K, self.cfg.num_hidden_layers):
            h, _ = self.layer(i, h, pos)
        logits = self.model.lm_head(self.lm.norm(h))[0]
        return logits, attn[0] if attn is not None else None, pos, keep_pos


@torch.no_grad()
def manual_pruned(sd, mc, emb, K, drop, renumber):
    """Independent plain-torch LLaMA with a pruning step; scores via the contract's 1-row formula."""
    tc = mc["text"]
    H, nh, nkv = tc["hidden"], tc["heads"], tc["kv_heads"]
    hd = H // nh
    W = lambda k: sd[k]
    rms = lambda x, p: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + tc["eps"]) * W(p + ".weight")
    x = emb[0].clone()
    L = x.shape[0]
    pos = torch.arange(L)
    score_row = None
    for i in range(tc["layers"]):
        if i == K:
            keep_pos = torch.tensor([p for p in range(L) if p not in set(drop)], dtype=torch.long)
            x = x[keep_pos]
            pos = torch.arange(len(keep_pos)) if renumber else keep_pos
        n = x.shape[0]
        p = f"lm.layers.{i}."
        h = rms(x, p + "input_layernorm")
        q = (h @ W(p + "self_attn.q_proj.weight").T).view(n, nh, hd).transpose(0, 1)
        k = (h @ W(p + "self_attn.k_proj.weight").T).view(n, nkv, hd).transpose(0, 1)
        v = (h @ W(p + "self_attn.v_proj.weight").T).view(n, nkv, hd).transpose(0, 1)
        q, k = rope_rotate_half(q, pos, tc["theta"]), rope_rotate_half(k, pos, tc["theta"])
        k = k.repeat_interleave(nh // nkv, 0)
        v = v.repeat_interleave(nh // nkv, 0)
        causal = torch.full((n, n), float("-inf")).triu(1)
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd) + causal, -1)
        if i == K - 1:  # only the selected query row: softmax(q_sel . K^T / sqrt(d)) (last row: no mask)
            score_row = torch.softmax(q[:, -1:] @ k.transpose(1, 2) / math.sqrt(hd), -1)[:, 0]  # [H, L]
        x = x + (a @ v).transpose(0, 1).reshape(n, H) @ W(p + "self_attn.o_proj.weight").T
        h = rms(x, p + "post_attention_layernorm")
        x = x + (torch.nn.functional.silu(h @ W(p + "mlp.gate_proj.weight").T)
                 * (h @ W(p + "mlp.up_proj.weight").T)) @ W(p + "mlp.down_proj.weight").T
    return rms(x, "lm.norm") @ W("lm_head.weight").T, score_row


def run_fixture(name, out_tensors, out_json):
    d = os.path.join(HERE, name)
    ref = load_file(os.path.join(HERE, f"{name}_ref.safetensors"))
    model = LlavaForConditionalGeneration.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(d)
    R = HFRunner(model)
    sd = load_dir_weights(d)
    mc = manual_cfg(model.config)
    pv = ref["pixel_values"]
    prompts = {1: ref["input_ids"], 2: ref["input_ids_2"]}
    checks = {}

    # ---- HF full forward vs the layer loop (no pruning) ----
    for pi, ids in prompts.items():
        with torch.no_grad():
            full = model(input_ids=ids[None], pixel_values=pv, output_attentions=True, output_hidden_states=True)
        emb = R.embeds(ids, pv)
        assert maxdiff(emb[0], full.hidden_states[0][0]) == 0.0, "embedding merge differs from HF's"
        logits, _, _, _ = R.run(emb, R.cfg.num_hidden_layers, [], False)  # K = all layers: plain loop
        d_full = maxdiff(logits, full.logits[0])
        d_ref = maxdiff(full.logits[0], ref["logits" if pi == 1 else "logits_2"])
        print(f"[{name}] p{pi} layer loop vs HF eager forward: {d_full:.3e}; HF eager vs {name}_ref (sdpa): {d_ref:.3e}")
        # the stored logits come from HF's default (sdpa) attention: not bit-equal to eager
        assert d_full < 1e-5 and d_ref < 5e-5
        checks[f"hf_eager_forward_vs_llava_ref_sdpa_logits_p{pi}"] = d_ref
        checks[f"layer_loop_vs_hf_forward_p{pi}"] = d_full
        for K in (1, 2):  # the hooked attention equals HF's own output_attentions
            _, attn, _, _ = R.run(emb, K, [], False)
            dA = maxdiff(attn, full.attentions[K - 1][0])
            assert dA == 0.0, (K, dA)

    n_heads = R.cfg.num_attention_heads
    for case, pi, K, keep, renumber in CASES:
        ids = prompts[pi]
        L = ids.shape[0]
        img_pos = (ids == R.image_token_id).nonzero()[:, 0]
        N = len(img_pos)
        assert torch.equal(img_pos, torch.arange(int(img_pos[0]), int(img_pos[0]) + N)), "image run not contiguous"
        emb = R.embeds(ids, pv)

        # ranking from layer K-1 (layers < K are unaffected by the drop, so this run is the prefill's)
        _, attn, _, _ = R.run(emb, K, [], False)
        attn_last = attn[:, L - 1, img_pos].contiguous()  # [H, N]
        scores = attn_last.mean(0)  # head strategy `sum`: weight 1/H each
        k = keep_count(keep, N)
        order = rank(scores)
        kept = sorted(order[:k])
        dropped = sorted(order[k:])
        drop_abs = [int(img_pos[j]) for j in dropped]
        s = scores.tolist()
        gap = (s[order[k - 1]] - s[order[k]]) if 0 < k < N else None
        if gap is not None:
            assert gap > 0, f"{name}/{case}: tie at the kept/dropped boundary"
            rel = gap / abs(s[order[k - 1]])
            assert rel > 1e-4, f"{name}/{case}: boundary gap too small ({gap:.3e}, rel {rel:.3e})"
        # the nearest pair anywhere in the ranking (ties elsewhere do not matter, reported only)
        srt = sorted(s, reverse=True)
        min_adj = min(a - b for a, b in zip(srt, srt[1:]))

        logits, _, pos_ids, keep_pos = R.run(emb, K, drop_abs, renumber)
        Lp = L - len(drop_abs)
        assert logits.shape == (Lp, model.config.text_config.vocab_size)

        # independent check
        man_logits, man_row = manual_pruned(sd, mc, emb, K, drop_abs, renumber)
        d_man = maxdiff(man_logits, logits)
        d_score = maxdiff(man_row[:, img_pos].mean(0), scores)
        assert d_man < 1e-4 and d_score < 1e-6, (d_man, d_score)
        if keep == 1.0:
            d_unpruned = maxdiff(logits, ref["logits" if pi == 1 else "logits_2"])
            with torch.no_grad():
                d_hf = maxdiff(logits, model(input_ids=ids[None], pixel_values=pv).logits[0])
            assert d_unpruned < 5e-5 and d_hf < 1e-5, (d_unpruned, d_hf)
            checks[f"{case}_vs_unpruned_hf_forward_max_abs"] = d_hf
            checks[f"{case}_vs_llava_ref_logits_max_abs"] = d_unpruned

        # greedy by full recompute, fixed drop set
        seq = ids.clone()
        gen = []
        for _ in range(N_GREEDY):
            lg, _, _, _ = R.run(R.embeds(seq, pv), K, drop_abs, renumber)
            nxt = int(lg[-1].argmax())
            gen.append(nxt)
            seq = torch.cat([seq, torch.tensor([nxt])])
        greedy = torch.tensor(gen, dtype=torch.int64)
        if keep == 1.0:
            g_ref = ref["greedy_ids" if pi == 1 else "greedy_ids_2"]
            assert torch.equal(greedy, g_ref), (greedy, g_ref)
            checks[f"{case}_greedy_equals_llava_ref"] = True

        pre = f"{name}_{case}"
        out_tensors[f"{pre}_kept"] = torch.tensor(kept, dtype=torch.int64)
        out_tensors[f"{pre}_scores"] = scores.float().contiguous()
        out_tensors[f"{pre}_attn_last"] = attn_last.float().contiguous()
        out_tensors[f"{pre}_position_ids"] = pos_ids.to(torch.int64).contiguous()
        out_tensors[f"{pre}_logits"] = logits.float().contiguous()
        out_tensors[f"{pre}_greedy"] = greedy
        text = tok.decode(gen, skip_special_tokens=False)
        out_json["cases"][pre] = {
            "fixture": name, "case": case, "prompt": pi,
            "plan": {"stages": [{"layer": K, "keep": keep, "keep_is_count": isinstance(keep, int)}],
                     "query_strategy": "last_token", "head_strategy": "sum", "renumber": renumber},
            "L": L, "L_pruned": Lp, "n_image": N, "first_image_pos": int(img_pos[0]), "n_heads": n_heads,
            "keep_count": k, "kept": kept, "dropped": dropped,
            "kept_positions": [int(p) for p in keep_pos if int(p) in set(img_pos.tolist())],
            "ranking": order,
            "boundary_gap": gap, "boundary_gap_rel": None if gap is None else gap / abs(s[order[k - 1]]),
            "min_adjacent_score_gap": min_adj,
            "manual_reimpl_max_abs_logits": d_man, "manual_reimpl_max_abs_scores": d_score,
            "greedy_ids": gen, "greedy_text": text,
        }
        g = "n/a" if gap is None else f"{gap:.3e} (rel {gap / abs(s[order[k - 1]]):.3e})"
        print(f"[{pre}] K={K} keep={keep} renumber={renumber}: L={L} L'={Lp} k={k} kept={kept} "
              f"gap={g} manual d={d_man:.2e}/{d_score:.2e} greedy={text!r}")
    out_json["checks"][name] = checks


def main():
    tensors, meta = {}, {
        "generator": "gen_fastv.py", "torch": torch.__version__, "transformers": transformers.__version__,
        "contract": "shared/PRUNING.md: single stage (K, keep), query last_token, head strategy sum (mean over heads)",
        "n_greedy": N_GREEDY,
        "tensors": {
            "{fixture}_{case}_kept": "i64 [k] kept indices within the image tokens (0..N-1), ascending",
            "{fixture}_{case}_scores": "f32 [N] importance = mean over heads of layer K-1's last-row attention to V",
            "{fixture}_{case}_attn_last": "f32 [H, N] layer K-1 attention A[h, L-1, V] per head (after softmax)",
            "{fixture}_{case}_position_ids": "i64 [L'] RoPE positions used by layers >= K (original, or 0..L'-1)",
            "{fixture}_{case}_logits": "f32 [L', vocab] prefill logits of the pruned sequence",
            "{fixture}_{case}_greedy": "i64 [24] greedy ids, EOS ignored, drop set fixed at prefill",
        },
        "cases": {}, "checks": {},
    }
    for name in FIXTURES:
        run_fixture(name, tensors, meta)
    tensors = dict(sorted(tensors.items()))
    save_file(tensors, os.path.join(HERE, "fastv_ref.safetensors"),
              metadata={"generator": f"gen_fastv.py torch {torch.__version__} transformers {transformers.__version__}"})
    with open(os.path.join(HERE, "fastv_ref.json"), "w") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)
        f.write("\n")
    size = os.path.getsize(os.path.join(HERE, "fastv_ref.safetensors"))
    print(f"wrote fastv_ref.safetensors ({size} bytes, {len(tensors)} tensors) and fastv_ref.json")
    assert size < 1_100_000


if __name__ == "__main__":
    main()
