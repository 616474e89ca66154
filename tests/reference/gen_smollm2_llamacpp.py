#!/usr/bin/env python3
"""What llama.cpp computes on the SmolLM2-135M Q4_1 GGUF, for tests/smollm2.rs's quantized path.

For every prompt of smollm2_ref.json (its token ids, so tokenization is not under test here):
the prompt's last-position logits and the greedy continuation (argmax, n_greedy steps, stopping
after EOS as the HF reference does), computed by llama.cpp through llama-cpp-python's bindings
over the libraries ../shared/tools/build-llamacpp.sh builds (llama.cpp as vendored in
llama-cpp-python 0.3.36, GGML_NATIVE on this machine's CPU, 2 threads), with an f32 KV cache
(llama.cpp's default is f16; fineprune's CPU cache is f32, and that rounding is not what the test
is about: the quantized matrix products are). Also the top-2 logit
margin at every greedy step, so a test can tell a near-tie from a real difference.

Writes smollm2_llamacpp.json (ids, margins, versions) and smollm2_llamacpp.safetensors
(`logits_last_{key}`, f32).

  bash ../shared/tools/build-llamacpp.sh target/peers/llama.cpp
  python3 -m venv /tmp/venv-lc && /tmp/venv-lc/bin/pip install numpy diskcache safetensors
  LLAMA_CPP_LIB_PATH=target/peers/llama.cpp/build/bin \\
  PYTHONPATH=target/peers/llama.cpp/llama_cpp_python-0.3.36 \\
    /tmp/venv-lc/bin/python tests/reference/gen_smollm2_llamacpp.py [--gguf PATH]
"""
import argparse
import hashlib
import json
import os

import llama_cpp
import numpy as np
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=os.path.join(ROOT, "target/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    a = ap.parse_args()
    ref = json.load(open(os.path.join(HERE, "smollm2_ref.json")))
    sha = hashlib.sha256(open(a.gguf, "rb").read()).hexdigest()
    assert sha == ref["gguf_sha256"], f"{a.gguf} is not the reference GGUF"
    eos = ref["generation"]["eos_token_id"]
    out = {"source": ref["source"], "gguf_sha256": sha, "llama_cpp_python": llama_cpp.__version__,
           "threads": 2, "kv_cache": "f32", "prompts": []}
    tensors = {}
    for p in ref["prompts"]:
        m = llama_cpp.Llama(a.gguf, n_ctx=256, n_threads=2, n_threads_batch=2, logits_all=True,
                            type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                            verbose=False)
        m.eval(p["input_ids"])
        tensors[f"logits_last_{p['key']}"] = np.asarray(m.scores[m.n_tokens - 1], np.float32).copy()
        ids, margins = [], []
        for _ in range(p["n_greedy"]):
            logits = np.asarray(m.scores[m.n_tokens - 1], np.float32)
            top2 = np.sort(logits)[-2:]
            ids.append(int(np.argmax(logits)))
            margins.append(float(top2[1] - top2[0]))
            if ids[-1] == eos:
                break
            m.eval([ids[-1]])
        out["prompts"].append({"key": p["key"], "greedy_ids": ids, "top2_margins": margins,
                               "greedy_text": m.detokenize(ids, special=True).decode("utf-8", "replace")})
        print(p["key"], repr(out["prompts"][-1]["greedy_text"]), f"min margin {min(margins):.3f}")
        del m
    save_file(tensors, os.path.join(HERE, "smollm2_llamacpp.safetensors"))
    with open(os.path.join(HERE, "smollm2_llamacpp.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
