#!/usr/bin/env python3
"""Reference chats for src/model/chat.rs: transformers' `apply_chat_template` on the two fixture models.

For each fixture directory (llava_gqa: chat_template.json + special_tokens_map.json; llava_tied:
chat_template.jinja) and each chat below, records the rendered string and the input_ids that
`processor.apply_chat_template(..., tokenize=True, return_dict=True)` produces (images are real PIL
images, so `<image>` is expanded by the processor itself: 25 tokens per image for llava_gqa, 26 for
llava_tied). One extra template (`CUSTOM`, passed as `chat_template=`) exercises what llava-hf's
template does not: a leading `{{ bos_token }}` (the processor then tokenizes without special
tokens), whitespace control with trim_blocks/lstrip_blocks, Python string methods, `tojson`,
`namespace`, loop controls, `{%- generation -%}`, an undefined variable and `strftime_now`.

Output: tests/reference/chat_ref.json
Run:    /tmp/venv-ref/bin/python tests/reference/gen_chat.py      (a few seconds; deterministic)
Pinned versions: see requirements.txt (asserted below).
"""
import json
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import transformers
from PIL import Image
from transformers import AutoProcessor

assert transformers.__version__ == "5.23.0", transformers.__version__

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGE = Image.open(os.path.join(HERE, "images", "tiny_scene.png")).convert("RGB")

CUSTOM = """{{ bos_token }}
{%- set ns = namespace(n=0) %}
{% for message in messages %}
    {% if loop.first and message['role'] == 'system' %}
[SYS] {{ message['content'][0]['text'] | trim }}
        {% continue %}
    {% endif %}
    {% set ns.n = ns.n + 1 %}
{{ message['role'] | upper }} {{ ns.n }}:
    {%- for part in message['content'] %}
        {%- if part['type'] == 'image' %} <image>
        {%- elif message['role'] == 'assistant' %}{% generation %} {{ part['text'].strip() }}{{ eos_token }}{% endgeneration %}
        {%- else %} {{ part['text'] }}{% endif %}
    {%- endfor %}
    {% if message['content'] | length > 2 %}{% break %}{% endif %}

{% endfor %}
{{- undefined_variable -}}
{{ {"n": ns.n, "roles": messages | map(attribute='role') | list, "ok": true, "x": none} | tojson }}
{{ strftime_now('%Y') | length }}
{% if add_generation_prompt %}ASSISTANT:{% endif %}"""


def text(t):
    return {"type": "text", "text": t}


def img():
    return {"type": "image"}


def user(*parts):
    return {"role": "user", "content": list(parts)}


CASES = [
    ("image_first", None, [user(img(), text("What color is the big square?"))], True),
    ("text_only", None, [user(text("Describe a sunset."))], True),
    ("system_user", None, [{"role": "system", "content": [text("Answer briefly.")]},
                           user(img(), text("How many circles are there?"))], True),
    ("multi_turn", None, [user(img(), text("What is this?")),
                          {"role": "assistant", "content": [text("A square and circles.")]},
                          user(text("Which one is bigger?"))], True),
    ("two_images_one_message", None, [user(text("Compare"), img(), img(), text("these two."))], True),
    ("images_in_two_messages", None, [user(img(), text("First picture.")),
                                      {"role": "assistant", "content": [text("Seen.")]},
                                      user(img(), text("Second one: same?"))], True),
    ("unicode", None, [user(img(), text("Qu'est-ce que c'est ? Ça coûte 5 € — naïve café, 日本語 🙂"))], True),
    ("no_generation_prompt", None, [user(img(), text("What color is the big square?"))], False),
    ("custom_template", CUSTOM, [{"role": "system", "content": [text("  Be terse.  ")]},
                                 user(img(), text("What is it?")),
                                 {"role": "assistant", "content": [text(" A scene. ")]},
                                 user(text("user"), text("More?"))], True),
]


def with_images(messages):
    """The same chat with a PIL image in every image part (what tokenize=True loads from)."""
    return [{**m, "content": [{**p, "image": IMAGE} if p["type"] == "image" else p for p in m["content"]]}
            for m in messages]


def main():
    out = {"transformers": transformers.__version__, "cases": []}
    for fixture in ["llava_gqa", "llava_tied"]:
        proc = AutoProcessor.from_pretrained(os.path.join(HERE, fixture))
        for name, template, messages, gen in CASES:
            kw = {"chat_template": template} if template else {}
            rendered = proc.apply_chat_template(messages, add_generation_prompt=gen, **kw)
            enc = proc.apply_chat_template(with_images(messages), add_generation_prompt=gen, tokenize=True,
                                           return_dict=True, **kw)
            ids = [int(i) for i in enc["input_ids"][0]]
            # the same ids by hand: the processor on the rendered text, special tokens unless it starts with BOS
            n_images = sum(p["type"] == "image" for m in messages for p in m["content"])
            by_hand = proc(text=rendered, images=[IMAGE] * n_images or None,
                           add_special_tokens=not rendered.startswith(proc.tokenizer.bos_token))
            assert [int(i) for i in by_hand["input_ids"][0]] == ids, (fixture, name)
            assert (ids[0] == proc.tokenizer.bos_token_id) and (ids.count(proc.tokenizer.bos_token_id) == 1), name
            out["cases"].append({
                "fixture": fixture,
                "name": name,
                "chat_template": template,
                "add_generation_prompt": gen,
                "messages": messages,
                "rendered": rendered,
                "input_ids": ids,
                "image_tokens": ids.count(proc.tokenizer.convert_tokens_to_ids(proc.image_token)),
            })
            print(f"{fixture} {name}: {len(ids)} ids {rendered!r}")
    with open(os.path.join(HERE, "chat_ref.json"), "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
