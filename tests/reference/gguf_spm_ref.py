"""What transformers builds from a SentencePiece (`tokenizer.ggml.model == "llama"`) GGUF vocabulary.

Writes a tiny vocabulary (byte tokens, pieces with tied scores, control and user-defined tokens)
into GGUF files with gguf-py's writer, loads each with transformers' AutoTokenizer (which derives BPE
merges from the scores), and records into gguf_spm_ref.json: the vocabulary, the ids for stress strings
with and without special tokens, the decoded text, and the tokenizer.json minus the vocabulary.
tests/gguf.rs rebuilds the same GGUF with its own writer and must give the same ids.

Run (pinned): /tmp/venv-hf/bin/pip install torch==2.15.0 transformers==5.23.0 gguf==0.19.0
              /tmp/venv-hf/bin/python tests/reference/gguf_spm_ref.py
"""

import json
import os
import tempfile

import transformers
from gguf import GGUFWriter
from transformers import AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))

TOKENS = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
TYPES = [2, 3, 3] + [6] * 256
SCORES = [0.0] * len(TOKENS)
PIECES = ["▁", "e", "l", "o", "h", "w", "r", "d", "t", "s", "a", "n", "i", "c", "f", "é", "日",
          "▁t", "he", "▁the", "ll", "llo", "▁he", "▁hello", "▁w", "or", "▁wor", "ld", "▁world",
          "in", "▁in", "an", "▁a", "ca", "▁ca", "▁caf", "▁café", "▁▁", "H", "▁H", "el", "▁Hel", "▁Hello",
          "▁▁▁", "ti", "tin", "▁tin"]
for i, p in enumerate(PIECES):
    TOKENS.append(p)
    TYPES.append(1)
    SCORES.append(-float(i // 3))  # ties: merge order then falls back to lengths and vocabulary ids
TOKENS += ["<tool>", "<|im_start|>"]
TYPES += [4, 3]
SCORES += [0.0, 0.0]

VARIANTS = [
    {"name": "default"},
    {"name": "no_space_prefix", "add_space_prefix": False},
    {"name": "bos_and_eos", "add_bos_token": True, "add_eos_token": True},
    {"name": "no_bos", "add_bos_token": False},
]
STRINGS = ["hello world", "Hello world", " hello", "  two  spaces", "   three", "the world\n", "café 日本",
           "<s>hello</s>", "<|im_start|>hi there", "<tool>x<tool>", "", "a\tb", "▁hello", "tin tint",
           "hello<unk>", "é日"]


def write(path, v):
    w = GGUFWriter(path, "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(TOKENS)
    w.add_token_types(TYPES)
    w.add_token_scores(SCORES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    if "add_space_prefix" in v:
        w.add_add_space_prefix(v["add_space_prefix"])
    if "add_bos_token" in v:
        w.add_add_bos_token(v["add_bos_token"])
    if "add_eos_token" in v:
        w.add_add_eos_token(v["add_eos_token"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


out = {"transformers": transformers.__version__, "tokens": TOKENS, "token_type": TYPES, "scores": SCORES,
       "variants": []}
with tempfile.TemporaryDirectory() as d:
    for v in VARIANTS:
        write(os.path.join(d, v["name"] + ".gguf"), v)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=v["name"] + ".gguf")
        backend = json.loads(tok.backend_tokenizer.to_str())
        backend["model"].pop("vocab")
        cases = []
        for s in STRINGS:
            ids = tok(s)["input_ids"]
            cases.append({"text": s, "ids": ids, "plain": tok(s, add_special_tokens=False)["input_ids"],
                          "decoded": tok.decode(ids)})
        out["variants"].append(dict(v, cases=cases, backend_without_vocab=backend))
with open(os.path.join(HERE, "gguf_spm_ref.json"), "w") as f:
    json.dump(out, f, ensure_ascii=False, indent=1)
print(json.dumps(out["variants"][0]["cases"], ensure_ascii=False)[:2000])
