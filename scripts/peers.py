#!/usr/bin/env python3
"""fineprune against llama.cpp's llama-bench on the SmolLM2-135M Q4_1 GGUF (issue 29's peer bench).

Interleaved rounds (llama.cpp, then fineprune, ROUNDS times) on the same threads: prefill tokens/s
(pp: a prompt of about --prompt-tokens tokens) and decode tokens/s (tg: --gen-tokens new tokens),
and each process's max RSS; prints the medians, the ratios fineprune / llama.cpp and the load
average beside them, and writes target/peers/peers.json.

  python3 scripts/peers.py [--rounds 3] [--threads 2] [--gguf PATH] [--torch PYTHON]

--torch PYTHON adds PyTorch f32 prefill (transformers loads the GGUF dequantised to f32, as
`from_pretrained(gguf_file=...)` does; forward of the same prompt, median of 3 after a warm-up) to
every round: PYTHON is an interpreter with torch, transformers and gguf installed.

llama-bench comes from ../shared/tools/build-llamacpp.sh (built once, cached under
target/peers/llama.cpp); fineprune from `cargo build --release --bin fineprune`.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_timed(cmd, env=None):
    """Runs cmd under /usr/bin/time; returns (stdout, max RSS in MiB)."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as f:
        out = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", f.name] + cmd, env=env,
                             check=True, capture_output=True, text=True)
        return out.stdout, int(f.read().strip().splitlines()[-1]) / 1024


def llama(bench, gguf, threads, pp, tg):
    rows = {}
    for name, p, n in (("pp", pp, 0), ("tg", 0, tg)):
        out, rss = run_timed([bench, "-m", gguf, "-t", str(threads), "-p", str(p), "-n", str(n),
                              "-r", "1", "-o", "json"])
        rows[name] = json.loads(out)[0]["avg_ts"]
        rows[name + "_rss"] = rss
    return rows


def fineprune(binary, gguf, threads, prompt, tg):
    """pp: the prompt and one new token; tg: tg tokens after a one-token prompt (llama-bench's
    tg starts from an empty context too)."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    rows = {}
    for name, text, n in (("pp", prompt, 1), ("tg", "word", tg)):
        with tempfile.NamedTemporaryFile("r", suffix=".json") as f:
            _, rss = run_timed([binary, "generate", "--model", gguf, "--raw", "--prompt", text,
                                "--max-new-tokens", str(n), "--ignore-eos", "--timings", f.name], env)
            t = json.load(open(f.name))
        rows[name] = t["prompt_tokens"] / t["prefill_secs"] if name == "pp" else \
            t["new_tokens"] / t["decode_secs"]
        rows[name + "_rss"] = rss
        rows.setdefault("prompt_tokens", t["prompt_tokens"])
    return rows


TORCH_PREFILL = r"""
import os, statistics, sys, time, torch
from transformers import AutoModelForCausalLM
gguf, threads, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
m = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                         torch_dtype=torch.float32).eval()
ids = torch.full((1, n), 1930, dtype=torch.long)
ts = []
with torch.inference_mode():
    for i in range(4):
        t = time.perf_counter()
        m(ids, use_cache=False, logits_to_keep=1)
        ts.append(time.perf_counter() - t)
print(n / statistics.median(ts[1:]))
"""


def torch_prefill(python, gguf, threads, n):
    """PyTorch f32 prefill tokens/s over n tokens and its max RSS."""
    out, rss = run_timed([python, "-c", TORCH_PREFILL, gguf, str(threads), str(n)],
                         dict(os.environ, OMP_NUM_THREADS=str(threads)))
    return {"pp": float(out.strip().splitlines()[-1]), "pp_rss": rss}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--gguf", default=os.environ.get(
        "FINEPRUNE_SMOLLM2_GGUF", os.path.join(ROOT, "target/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
    ap.add_argument("--torch", metavar="PYTHON", help="also time PyTorch f32 prefill with this interpreter")
    a = ap.parse_args()
    if not os.path.exists(a.gguf):
        sys.exit(f"error: {a.gguf} is absent (.ci/run fetches it)")
    bench = subprocess.run(["bash", os.path.join(ROOT, "..", "shared", "tools", "build-llamacpp.sh"),
                            os.path.join(ROOT, "target/peers/llama.cpp")],
                           check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    subprocess.run(["cargo", "build", "--release", "--bin", "fineprune"], cwd=ROOT, check=True)
    binary = os.path.join(ROOT, "target/release/fineprune")
    # "word " is one token in SmolLM2's vocabulary: the raw prompt is --prompt-tokens tokens.
    prompt = "word " * a.prompt_tokens
    ours, theirs, torch = [], [], []
    for r in range(a.rounds):
        theirs.append(llama(bench, a.gguf, a.threads, a.prompt_tokens, a.gen_tokens))
        ours.append(fineprune(binary, a.gguf, a.threads, prompt, a.gen_tokens))
        if a.torch:
            torch.append(torch_prefill(a.torch, a.gguf, a.threads, ours[-1]["prompt_tokens"]))
        print(f"round {r + 1}: llama.cpp pp {theirs[-1]['pp']:.1f} tg {theirs[-1]['tg']:.1f}, "
              f"fineprune pp {ours[-1]['pp']:.1f} tg {ours[-1]['tg']:.1f} "
              f"({ours[-1]['prompt_tokens']} prompt tokens)"
              + (f", torch f32 pp {torch[-1]['pp']:.1f}" if torch else ""), flush=True)
    med = lambda rows, k: statistics.median(r[k] for r in rows)
    table = {
        "prefill tokens/s": (med(ours, "pp"), med(theirs, "pp")),
        "decode tokens/s": (med(ours, "tg"), med(theirs, "tg")),
        "max RSS MiB": (max(med(ours, "pp_rss"), med(ours, "tg_rss")),
                        max(med(theirs, "pp_rss"), med(theirs, "tg_rss"))),
    }
    load = os.getloadavg()
    print(f"\n{'':18} {'fineprune':>10} {'llama.cpp':>10} {'ratio':>7}   "
          f"(threads {a.threads}, {a.rounds} interleaved rounds, medians; load {load[0]:.2f} {load[1]:.2f})")
    for k, (x, y) in table.items():
        print(f"{k:18} {x:10.1f} {y:10.1f} {x / y:7.2f}")
    if torch:
        t = med(torch, "pp")
        table["torch f32 prefill tokens/s"] = t
        print(f"{'':18} {'fineprune':>10} {'torch f32':>10} {'ratio':>7}")
        print(f"{'prefill tokens/s':18} {med(ours, 'pp'):10.1f} {t:10.1f} {med(ours, 'pp') / t:7.2f}")
    os.makedirs(os.path.join(ROOT, "target/peers"), exist_ok=True)
    out = os.path.join(ROOT, "target/peers/peers.json")
    with open(out + ".tmp", "w") as f:
        json.dump({"threads": a.threads, "rounds": a.rounds, "load": load, "fineprune": ours,
                   "llama.cpp": theirs, "torch": torch, "medians": table}, f, indent=1)
    os.replace(out + ".tmp", out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
