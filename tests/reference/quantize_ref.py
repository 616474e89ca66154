"""Reference blocks for src/model/quantize.rs: llama.cpp's own quantizers on fixed inputs.

Writes tests/reference/quantize_ref.safetensors with
  * `x` (f32, [rows, 512]): inputs with the awkward cases (all-zero and constant blocks, one
    outlier, all-positive and all-negative blocks, exact rounding ties, tiny and large magnitudes);
  * `q.<TYPE>` (u8): `quantize_row_<type>_ref` of llama.cpp's ggml library (what llama-quantize
    writes without an importance matrix) for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K.
gguf-py's numpy quantizers (`gguf.quants.quantize`; it has Q4_0..Q8_0, not the K-types) must give
the same bytes for the types it has, or the script stops.

The library is llama.cpp's libggml-base.so as ../shared/tools/build-llamacpp.sh builds it
(target/peers/llama.cpp/build/bin/; its ggml-quants.c is compiled without -march=native, so no
fused multiply-adds, like the Rust quantizers).

Run: python3 -m venv /tmp/venv-q && /tmp/venv-q/bin/pip install gguf==0.19.0 numpy==2.4.6 safetensors==0.8.0
     /tmp/venv-q/bin/python tests/reference/quantize_ref.py [path/to/libggml-base.so]
"""

import ctypes
import os
import sys

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "quantize_ref.safetensors")
LIB = os.path.join(HERE, "..", "..", "target", "peers", "llama.cpp", "build", "bin", "libggml-base.so")
TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]
NUMPY_HAS = {T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0}

rng = np.random.default_rng(29)
K = 512  # two 256-element super-blocks per row


def blocks32(parts):
    """A row of 512 from sixteen 32-element parts."""
    row = np.concatenate(parts).astype(np.float32)
    assert row.size == K
    return row


n = lambda s=1.0, size=32: rng.standard_normal(size) * s
outlier = n(0.01)
outlier[7] = 10.0
ties = np.tile(np.arange(-8, 8, dtype=np.float32) * 0.5, 2)  # x / d lands on .5 for several d
rows = [
    n(size=K),
    n(0.02, K),
    rng.uniform(0.5, 2.0, K),
    -rng.uniform(0.5, 2.0, K),
    rng.laplace(0, 0.05, K),
    n(100.0, K),
    blocks32([
        np.zeros(32), np.full(32, 1.5), np.full(32, -0.3), outlier,
        ties, ties * 0.125, n(1e-6), n(1e3),
        np.zeros(32), np.zeros(32), np.zeros(32), np.zeros(32),
        np.zeros(32), np.zeros(32), np.zeros(32), n(),
    ]),
    blocks32([
        np.abs(n()), -np.abs(n()), n() + 3.0, n() - 3.0,
        ties + 0.25, np.linspace(-1, 1, 32), np.linspace(0, 1, 32), np.full(32, 7.0),
        n(0.5), n(2.0), n(0.1), outlier * -1,
        np.concatenate([np.zeros(16), n(size=16)]), n(0.3), n(0.03), n(3.0),
    ]),
]
x = np.stack(rows).astype(np.float32)

lib = ctypes.CDLL(sys.argv[1] if len(sys.argv) > 1 else LIB)
out = {"x": x}
for qt in TYPES:
    bs, ts = GGML_QUANT_SIZES[qt]
    fn = getattr(lib, f"quantize_row_{qt.name.lower().replace('_k', '_K')}_ref")
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    got = np.zeros(x.size // bs * ts, dtype=np.uint8)
    xc = np.ascontiguousarray(x)
    fn(xc.ctypes.data, got.ctypes.data, xc.size)
    if qt in NUMPY_HAS:
        ref = quantize(x, qt).reshape(-1)
        if not np.array_equal(ref, got):
            sys.exit(f"{qt.name}: gguf-py and libggml disagree at byte {np.argmax(ref != got)}")
    out[f"q.{qt.name}"] = got
    print(f"{qt.name}: {got.size} bytes" + (" (gguf-py agrees)" if qt in NUMPY_HAS else ""))

save_file(out, OUT, metadata={"llama_cpp": "llama-cpp-python 0.3.36 vendor", "gguf": "0.19.0"})
print("wrote", OUT)
