"""Token ids transformers gives for SmolLM2's GGUF tokenizer, for tests/gguf.rs.

transformers builds the tokenizer from the GGUF metadata (integrations/gguf/gguf_tokenizer_mapping.py);
this records its ids for strings that stress the pre-tokenizer, special tokens and byte-level
spelling, plus the tokenizer.json it builds, reduced to everything but the vocabulary and merges.

Run (pinned): python3 -m venv /tmp/venv-hf && /tmp/venv-hf/bin/pip install torch==2.15.0 transformers==5.23.0 gguf==0.19.0
     /tmp/venv-hf/bin/python tests/reference/gguf_tokenizer_ref.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
"""

import json
import os
import sys

import transformers
from transformers import AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT = os.path.join(HERE, "..", "..", "target", "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
path = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("FINEPRUNE_SMOLLM2_GGUF", DEFAULT))

STRINGS = [
    "Hello world",
    "Hello, world! How are you?",
    "  leading spaces",
    "trailing spaces   ",
    "   ",
    "tabs\tand\nnewlines\n\nand\r\nCRLF",
    "2024 is 12345 and 3.14159",
    "x² + y³ = z¹ and ½",
    "don't I'LL we've they'd",
    "naïve café résumé",
    "日本語のテキスト",
    "Здравствуйте, мир",
    "emoji 🤖👍🏽 flags 🇫🇷",
    "\u00a0non-breaking\u2009thin",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|><|im_end|><|endoftext|>",
    "a<|endoftext|>b <repo_name>x",
    "<|im_start |> not special",
    "def f(x):\n    return x**2  # square\n",
    "URL: https://example.com/a?b=c&d=e",
    "",
]

tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
cases = []
for s in STRINGS:
    ids = tok(s)["input_ids"]
    cases.append({"text": s, "ids": ids, "decoded": tok.decode(ids)})
# Chats through the GGUF's own template (`tokenizer.chat_template`), as a text model's tokenizer
# renders and tokenizes them (tests/smollm2.rs checks the engine's chat prompts against these).
CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
     {"role": "user", "content": "Tell me a joke about café owners."}],
]
chats = []
for msgs in CHATS:
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    chats.append({"messages": msgs, "text": text, "ids": list(ids)})
backend = json.loads(tok.backend_tokenizer.to_str())
backend["model"] = {k: v for k, v in backend["model"].items() if k not in ("vocab", "merges")}
ref = {
    "transformers": transformers.__version__,
    "model": os.path.basename(path),
    "cases": cases,
    "chats": chats,
    "backend_without_vocab": backend,
}
with open(os.path.join(HERE, "gguf_tokenizer_ref.json"), "w") as f:
    json.dump(ref, f, ensure_ascii=False, indent=1)
print(json.dumps(cases, ensure_ascii=False)[:3000])
