#!/usr/bin/env python3
"""Generate two tiny random LLaVA-1.5 checkpoints and their reference outputs.

Outputs (all under tests/reference/):
  images/tiny_scene.png       47x38 RGB test image (created once, then always read back)
  llava_gqa/                  checkpoint A: OLD (transformers 4.x) key layout + config spellings,
                              GQA, untied lm_head, f32, 2 shards + model.safetensors.index.json
  llava_tied/                 checkpoint B: NEW layout exactly as transformers 5.23 save_pretrained
                              writes it, MHA, tied embeddings, vision_feature_layer [-3, -1],
                              "full" strategy, bf16 weights
  llava_gqa_ref.safetensors / llava_tied_ref.safetensors   reference tensors
  llava_gqa_ref.json / llava_tied_ref.json                 prompts, counts, decoded text, facts

Run:  /tmp/venv-ref/bin/python tests/reference/gen_llava.py
Pinned versions: see requirements.txt (asserted below).
"""
import json
import math
import os
import random
import shutil

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

assert torch.__version__.split("+")[0] == "2.15.0", torch.__version__
assert transformers.__version__ == "5.23.0", transformers.__version__

HERE = os.path.dirname(os.path.abspath(__file__))
IMG_PATH = os.path.join(HERE, "images", "tiny_scene.png")

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
PROMPT_1 = "USER: <image>\nWhat color is the big square? ASSISTANT:"
PROMPT_2 = SYSTEM + " USER: <image>\nHow many circles are there? ASSISTANT:"

# llava-hf/llava-1.5-7b-hf chat template (as shipped in its chat_template.json)
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

N_GREEDY = 24
TOTAL_VOCAB = 512  # 3 specials + 256 byte tokens + trained BPE tokens + <image> + <pad>


# ----------------------------------------------------------------------------------------------
# Image
# ----------------------------------------------------------------------------------------------
def make_image():
    """A 47x38 photo-like scene: gradient background, a big square, circles, a triangle, noise."""
    if os.path.exists(IMG_PATH):
        return
    os.makedirs(os.path.dirname(IMG_PATH), exist_ok=True)
    rng = np.random.default_rng(7)
    W, H = 47, 38
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    img = np.zeros((H, W, 3))
    img[..., 0] = 60 + 80 * xx / W
    img[..., 1] = 120 + 60 * yy / H
    img[..., 2] = 200 - 70 * (xx + yy) / (W + H)
    img[6:24, 4:22] = [210, 40, 35]  # big red square
    for cx, cy, r, col in [(31, 10, 5, [40, 70, 220]), (40, 27, 4, [240, 220, 40]), (28, 29, 3, [40, 200, 90])]:
        m = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        img[m] = col
    tri = (yy >= 26) & (yy <= 36) & (np.abs(xx - 12) <= (yy - 26) * 0.8)
    img[tri] = [150, 60, 170]
    img += rng.normal(0, 9, img.shape)
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    Image.fromarray(img, "RGB").save(IMG_PATH, optimize=False)


# ----------------------------------------------------------------------------------------------
# Tokenizer: LLaMA-style BPE with byte fallback, trained on a small shapes corpus
# ----------------------------------------------------------------------------------------------
def corpus():
    r = random.Random(1234)
    colors = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "pink", "brown", "gray"]
    shapes = ["square", "circle", "triangle", "rectangle", "star", "hexagon", "diamond"]
    sizes = ["big", "small", "tiny", "large"]
    places = ["left", "right", "top", "bottom", "center", "middle", "corner"]
    nums = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    out = [SYSTEM] * 40 + ["USER: What is in the image? ASSISTANT: There are some shapes.", PROMPT_1.replace("<image>\n", "")]
    for _ in range(420):
        c, c2 = r.choice(colors), r.choice(colors)
        s, s2 = r.choice(shapes), r.choice(shapes)
        z, p, n = r.choice(sizes), r.choice(places), r.randrange(0, 12)
        t = r.randrange(14)
        if t == 0:
            out.append(f"What color is the {z} {s}?")
        elif t == 1:
            out.append(f"The {z} {s} is {c}.")
        elif t == 2:
            out.append(f"How many {s}s are there?")
        elif t == 3:
            out.append(f"There are {n} {s}s in the picture.")
        elif t == 4:
            out.append(f"There are {nums[n % 10]} {c} {s}s.")
        elif t == 5:
            out.append(f"Where is the {c} {s}? It is at the {p}.")
        elif t == 6:
            out.append(f"Is there a {c} {s}? Yes, there is a {z} {c} {s} on the {p}.")
        elif t == 7:
            out.append(f"Is the {s} {c}? No, the {s} is {c2}.")
        elif t == 8:
            out.append(f"USER: What shape is {c}? ASSISTANT: The {c} shape is a {s}.")
        elif t == 9:
            out.append(f"The {s} is to the {p} of the {c2} {s2}.")
        elif t == 10:
            out.append(f"I can see a {z} {c} {s} and {n} {c2} {s2}s.")
        elif t == 11:
            out.append(f"Which shape is the biggest? The {c} {s} is bigger than the {s2}.")
        elif t == 12:
            out.append(f"Count the {c} shapes: {n}.")
        else:
            out.append(f"The picture shows a {c} {s} next to a {c2} {s2}, with {n} dots.")
    return out


def build_tokenizer():
    # 1) train merges with whitespace-split words (merges never cross a word boundary, like LLaMA's)
    n_trained = TOTAL_VOCAB - 3 - 256 - 2
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=n_trained, min_frequency=2, special_tokens=[], show_progress=False)
    t.train_from_iterator(corpus(), trainer)
    m = json.loads(t.to_str())["model"]
    trained = sorted(m["vocab"].items(), key=lambda kv: kv[1])
    assert len(trained) == n_trained, (len(trained), n_trained)
    merges = [tuple(x) if isinstance(x, list) else tuple(x.split(" ")) for x in m["merges"]]

    # 2) LLaMA layout: <unk>=0 <s>=1 </s>=2, <0x00>..<0xFF>=3..258, then the trained pieces
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for tok, _ in trained:
        assert tok not in vocab
        vocab[tok] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tk.normalizer = None
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tk.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tk.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    sp = dict(special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
    tk.add_special_tokens([AddedToken("<unk>", **sp), AddedToken("<s>", **sp), AddedToken("</s>", **sp)])
    tk.add_special_tokens([AddedToken("<image>", **sp), AddedToken("<pad>", **sp)])
    assert tk.get_vocab_size(with_added_tokens=True) == TOTAL_VOCAB

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=256,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    assert len(hf) == TOTAL_VOCAB
    ids = hf("Hello")["input_ids"]
    assert ids[0] == 1, ids  # BOS added by the post-processor
    return hf


def build_processor(tokenizer, strategy):
    ip = CLIPImageProcessorPil(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    return LlavaProcessor(
        image_processor=ip,
        tokenizer=tokenizer,
        patch_size=6,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,  # CLS
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
def make_config(variant, tokenizer):
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    pad_id = tokenizer.convert_tokens_to_ids("<pad>")
    vision = CLIPVisionConfig(
        image_size=30,
        patch_size=6,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=32,
    )
    if variant == "gqa":
        text = LlamaConfig(
            vocab_size=TOTAL_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, hidden_act="silu",
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=pad_id,
        )
        cfg = LlavaConfig(
            vision_config=vision, text_config=text, image_token_index=image_id, image_seq_length=25,
            projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-2,
            multimodal_projector_bias=True, tie_word_embeddings=False,
        )
    else:
        text = LlamaConfig(
            vocab_size=TOTAL_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, hidden_act="silu",
            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=pad_id,
        )
        cfg = LlavaConfig(
            vision_config=vision, text_config=text, image_token_index=image_id, image_seq_length=26,
            projector_hidden_act="gelu", vision_feature_select_strategy="full", vision_feature_layer=[-3, -1],
            multimodal_projector_bias=True, tie_word_embeddings=True,
        )
    cfg.pad_token_id = pad_id
    return cfg


@torch.no_grad()
def randomize(model, seed):
    """Re-initialise every parameter so that all of them visibly affect the outputs."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda p: torch.randn(p.shape, generator=g, dtype=torch.float32)
    for name, p in model.named_parameters():
        is_norm = any(k in name for k in ("norm", "layrnorm"))
        if is_norm and name.endswith("weight"):
            p.copy_(1.0 + 0.25 * rn(p))
        elif name.endswith("bias"):
            p.copy_(0.1 * rn(p))
        elif "embed_tokens" in name:
            p.copy_(0.5 * rn(p))
        elif "position_embedding" in name or "class_embedding" in name:
            p.copy_(0.5 * rn(p))
        elif "patch_embedding" in name:
            p.copy_(rn(p) / math.sqrt(p[0].numel()))
        elif "lm_head" in name:
            p.copy_(3.0 * rn(p) / math.sqrt(p.shape[1]))
        elif p.dim() == 2:
            p.copy_(1.2 * rn(p) / math.sqrt(p.shape[1]))
        else:
            raise RuntimeError(f"unhandled parameter {name} {tuple(p.shape)}")


def new_model(cfg, seed):
    torch.manual_seed(seed)
    m = LlavaForConditionalGeneration(cfg).to(torch.float32).eval()
    randomize(m, seed)
    return m


# ----------------------------------------------------------------------------------------------
# Checkpoint A writer: old (transformers 4.x) layout, sharded, f32
# ----------------------------------------------------------------------------------------------
def old_key(k):
    if k.startswith("model.language_model."):
        return "language_model.model." + k[len("model.language_model."):]
    if k == "lm_head.weight":
        return "language_model.lm_head.weight"
    if k.startswith("model.vision_tower."):
        return "vision_tower.vision_model." + k[len("model.vision_tower."):]
    if k.startswith("model.multi_modal_projector."):
        return k[len("model."):]
    raise KeyError(k)


def write_old_checkpoint(model, cfg, out_dir):
    sd = {old_key(k): v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    # shard 1: vision tower + projector + embeddings; shard 2: decoder layers, final norm, lm_head
    s1 = {k: v for k, v in sd.items() if not k.startswith("language_model.model.layers.")
          and k not in ("language_model.model.norm.weight", "language_model.lm_head.weight")}
    s2 = {k: v for k, v in sd.items() if k not in s1}
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map, total = {}, 0
    for fname, shard in zip(names, [s1, s2]):
        save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
        for k, v in shard.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
        f.write("\n")

    tc, vc = cfg.text_config, cfg.vision_config
    config = {
        "architectures": ["LlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_seq_length": 25,
        "image_token_index": cfg.image_token_index,
        "model_type": "llava",
        "multimodal_projector_bias": True,
        "pad_token_id": cfg.pad_token_id,
        "projector_hidden_act": "gelu",
        "text_config": {
            "_name_or_path": "tiny-random-vicuna",
            "architectures": ["LlamaForCausalLM"],
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "head_dim": 16,
            "hidden_act": "silu",
            "hidden_size": tc.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": tc.intermediate_size,
            "max_position_embeddings": tc.max_position_embeddings,
            "mlp_bias": False,
            "model_type": "llama",
            "num_attention_heads": tc.num_attention_heads,
            "num_hidden_layers": tc.num_hidden_layers,
            "num_key_value_heads": tc.num_key_value_heads,
            "pad_token_id": cfg.pad_token_id,
            "pretraining_tp": 1,
            "rms_norm_eps": tc.rms_norm_eps,
            "rope_scaling": None,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "torch_dtype": "float32",
            "use_cache": True,
            "vocab_size": tc.vocab_size,
        },
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.46.3",
        "vision_config": {
            "attention_dropout": 0.0,
            "hidden_act": "quick_gelu",
            "hidden_size": vc.hidden_size,
            "image_size": vc.image_size,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "intermediate_size": vc.intermediate_size,
            "layer_norm_eps": vc.layer_norm_eps,
            "model_type": "clip_vision_model",
            "num_attention_heads": vc.num_attention_heads,
            "num_channels": 3,
            "num_hidden_layers": vc.num_hidden_layers,
            "patch_size": vc.patch_size,
            "projection_dim": vc.projection_dim,
        },
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": tc.vocab_size,
    }
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2,
                   "pad_token_id": cfg.pad_token_id, "transformers_version": "4.46.3"}, f, indent=2)
        f.write("\n")


def to_old_processor_files(out_dir, tokenizer):
    """Rewrite the processor/tokenizer side files the way transformers 4.x wrote them for llava-1.5-hf:
    preprocessor_config.json (flat image processor), processor_config.json (no nested image processor),
    chat_template.json, special_tokens_map.json and a 4.x tokenizer_config.json (LlamaTokenizer)."""
    jinja = os.path.join(out_dir, "chat_template.jinja")
    with open(jinja) as f:
        tpl = f.read()
    os.remove(jinja)
    dump = lambda name, obj: (json.dump(obj, open(os.path.join(out_dir, name), "w"), indent=2, ensure_ascii=False),
                              open(os.path.join(out_dir, name), "a").write("\n"))
    dump("chat_template.json", {"chat_template": tpl})
    pc = json.load(open(os.path.join(out_dir, "processor_config.json")))
    ipc = pc.pop("image_processor")
    ipc["processor_class"] = "LlavaProcessor"
    dump("preprocessor_config.json", dict(sorted(ipc.items())))
    dump("processor_config.json", dict(sorted(pc.items())))
    tok = lambda c: {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    dump("special_tokens_map.json", {"bos_token": tok("<s>"), "eos_token": tok("</s>"), "image_token": "<image>",
                                     "pad_token": tok("<pad>"), "unk_token": tok("<unk>")})
    added = {str(tokenizer.convert_tokens_to_ids(c)): dict(tok(c), special=True)
             for c in ["<unk>", "<s>", "</s>", "<image>", "<pad>"]}
    dump("tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "add_prefix_space": None, "added_tokens_decoder": added,
        "bos_token": "<s>", "clean_up_tokenization_spaces": False, "eos_token": "</s>",
        "extra_special_tokens": {"image_token": "<image>"}, "image_token": "<image>", "legacy": False,
        "model_max_length": 256, "pad_token": "<pad>", "padding_side": "left", "processor_class": "LlavaProcessor",
        "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>", "use_default_system_prompt": False,
    })


# transformers 5.23's save_pretrained does NOT write the in-memory names: it reverse-applies its llava
# conversion mapping and writes `language_model.model.*`, `vision_tower.*` (no `vision_model.`) and
# `multi_modal_projector.*`. Checkpoint A already covers `language_model.model.*`; to cover the new
# `model.language_model.*` / `model.vision_tower.*` / `model.multi_modal_projector.*` prefixes, B's weights are
# rewritten with the in-memory state_dict names (everything else in B is exactly what save_pretrained wrote).
# Set B_KEYS = "as_saved" to keep save_pretrained's own key names instead.
B_KEYS = "in_memory"


def rewrite_new_layout(model, out_dir):
    path = os.path.join(out_dir, "model.safetensors")
    saved = load_file(path)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert len(saved) == len(sd), (len(saved), len(sd))
    assert sorted(v.numel() for v in saved.values()) == sorted(v.numel() for v in sd.values())
    for k, v in saved.items():  # the saved file is the same tensors under other names
        k_mem = ("model." + k.replace("language_model.model.", "language_model.", 1)) if not k.startswith("model.") else k
        assert torch.equal(sd[k_mem], v), k
    if B_KEYS == "in_memory":
        save_file(sd, path, metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------
# Independent re-implementation (documents the numerics contract; checks HF and RoPE)
# ----------------------------------------------------------------------------------------------
def norm_key(k):
    """Map either layout to one canonical naming."""
    for a, b in [("language_model.model.", "lm."), ("model.language_model.", "lm."),
                 ("language_model.lm_head.", "lm_head."), ("model.vision_tower.", "vt."),
                 ("vision_tower.", "vt."), ("model.multi_modal_projector.", "proj."),
                 ("multi_modal_projector.", "proj.")]:
        if k.startswith(a):
            k = b + k[len(a):]
            break
    return k.replace("vt.vision_model.", "vt.")


def load_dir_weights(d):
    idx = os.path.join(d, "model.safetensors.index.json")
    files = sorted(set(json.load(open(idx))["weight_map"].values())) if os.path.exists(idx) else ["model.safetensors"]
    sd = {}
    for f in files:
        for k, v in load_file(os.path.join(d, f)).items():
            sd[norm_key(k)] = v.to(torch.float32)
    if "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["lm.embed_tokens.weight"]  # tied
    return sd


def rope_rotate_half(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = pos[:, None].float() * inv[None, :]
    cos = torch.cat([ang.cos(), ang.cos()], -1)
    sin = torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def rope_interleaved(x, pos, theta):  # GPT-J / llama.cpp NORM style, for the negative check
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = pos[:, None].float() * inv[None, :]
    c, s = ang.cos(), ang.sin()
    xe, xo = x[..., 0::2], x[..., 1::2]
    return torch.stack([xe * c - xo * s, xe * s + xo * c], -1).flatten(-2)


@torch.no_grad()
def manual_forward(sd, cfg, input_ids, pixel_values, rope=rope_rotate_half):
    vc, tc = cfg["vision"], cfg["text"]
    W = lambda k: sd[k]
    ln = lambda x, p, eps: torch.nn.functional.layer_norm(x, x.shape[-1:], W(p + ".weight"), W(p + ".bias"), eps)
    lin = lambda x, p: x @ W(p + ".weight").T + (W(p + ".bias") if p + ".bias" in sd else 0)
    # --- CLIP vision tower ---
    ps = vc["patch_size"]
    x = torch.nn.functional.conv2d(pixel_values, W("vt.embeddings.patch_embedding.weight"), stride=ps)
    x = x.flatten(2).transpose(1, 2)[0]  # [25, 32], patches row-major
    x = torch.cat([W("vt.embeddings.class_embedding")[None], x], 0) + W("vt.embeddings.position_embedding.weight")
    x = ln(x, "vt.pre_layrnorm", vc["eps"])
    hs = [x]
    nh, hd = vc["heads"], vc["hidden"] // vc["heads"]
    for i in range(vc["layers"]):
        p = f"vt.encoder.layers.{i}."
        h = ln(x, p + "layer_norm1", vc["eps"])
        q = lin(h, p + "self_attn.q_proj").view(-1, nh, hd).transpose(0, 1)
        k = lin(h, p + "self_attn.k_proj").view(-1, nh, hd).transpose(0, 1)
        v = lin(h, p + "self_attn.v_proj").view(-1, nh, hd).transpose(0, 1)
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), -1) @ v
        x = x + lin(a.transpose(0, 1).reshape(-1, vc["hidden"]), p + "self_attn.out_proj")
        h = ln(x, p + "layer_norm2", vc["eps"])
        h = lin(h, p + "mlp.fc1")
        h = h * torch.sigmoid(1.702 * h)  # quick_gelu
        x = x + lin(h, p + "mlp.fc2")
        hs.append(x)
    layers = vc["feature_layer"] if isinstance(vc["feature_layer"], list) else [vc["feature_layer"]]
    feats = [hs[l] for l in layers]  # indexes the list that STARTS with the embeddings
    if vc["strategy"] == "default":
        feats = [f[1:] for f in feats]
    f = torch.cat(feats, -1)
    f = lin(f, "proj.linear_1")
    f = torch.nn.functional.gelu(f)  # exact erf GELU
    img = lin(f, "proj.linear_2")
    # --- LLaMA ---
    ids = input_ids
    e = W("lm.embed_tokens.weight")[ids].clone()
    mask = ids == cfg["image_token_id"]
    assert int(mask.sum()) == img.shape[0]
    e[mask] = img
    L = ids.shape[0]
    pos = torch.arange(L)
    H, nh, nkv = tc["hidden"], tc["heads"], tc["kv_heads"]
    hd = H // nh
    rms = lambda x, p: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + tc["eps"]) * W(p + ".weight")
    x = e
    lhs = [x]
    causal = torch.full((L, L), float("-inf")).triu(1)
    for i in range(tc["layers"]):
        p = f"lm.layers.{i}."
        h = rms(x, p + "input_layernorm")
        q = (h @ W(p + "self_attn.q_proj.weight").T).view(L, nh, hd).transpose(0, 1)
        k = (h @ W(p + "self_attn.k_proj.weight").T).view(L, nkv, hd).transpose(0, 1)
        v = (h @ W(p + "self_attn.v_proj.weight").T).view(L, nkv, hd).transpose(0, 1)
        q, k = rope(q, pos, tc["theta"]), rope(k, pos, tc["theta"])
        k = k.repeat_interleave(nh // nkv, 0)  # query head j uses kv head j // (nh/nkv)
        v = v.repeat_interleave(nh // nkv, 0)
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd) + causal, -1) @ v
        x = x + a.transpose(0, 1).reshape(L, H) @ W(p + "self_attn.o_proj.weight").T
        h = rms(x, p + "post_attention_layernorm")
        g = h @ W(p + "mlp.gate_proj.weight").T
        u = h @ W(p + "mlp.up_proj.weight").T
        x = x + (torch.nn.functional.silu(g) * u) @ W(p + "mlp.down_proj.weight").T
        lhs.append(x)
    x = rms(x, "lm.norm")
    lhs[-1] = x  # HF ties the last hidden state to the final-norm output
    return {"vision_hidden_states": torch.stack(hs), "image_features": img,
            "lm_hidden_states": torch.stack(lhs), "logits": x @ W("lm_head.weight").T}


def manual_cfg(cfg):
    tc, vc = cfg.text_config, cfg.vision_config
    return {
        "image_token_id": cfg.image_token_id,
        "vision": {"patch_size": vc.patch_size, "eps": vc.layer_norm_eps, "heads": vc.num_attention_heads,
                   "hidden": vc.hidden_size, "layers": vc.num_hidden_layers,
                   "feature_layer": cfg.vision_feature_layer, "strategy": cfg.vision_feature_select_strategy},
        "text": {"hidden": tc.hidden_size, "heads": tc.num_attention_heads, "kv_heads": tc.num_key_value_heads,
                 "eps": tc.rms_norm_eps, "layers": tc.num_hidden_layers,
                 "theta": tc.rope_parameters["rope_theta"]},
    }


# ----------------------------------------------------------------------------------------------
# Reference computation
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def full_outputs(model, input_ids, pixel_values):
    out = model(input_ids=input_ids[None], pixel_values=pixel_values, output_hidden_states=True)
    vt = model.model.vision_tower(pixel_values, output_hidden_states=True)
    img = model.model.get_image_features(
        pixel_values, vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy).pooler_output
    return {
        "logits": out.logits[0].float().contiguous(),
        "lm_hidden_states": torch.stack([h[0] for h in out.hidden_states]).float().contiguous(),
        "vision_hidden_states": torch.stack([h[0] for h in vt.hidden_states]).float().contiguous(),
        "image_features": img[0].float().contiguous(),
    }


@torch.no_grad()
def greedy(model, input_ids, pixel_values, pad_id):
    # eos_token_id=None in the GenerationConfig (and the model's generation_config emptied) disables
    # EOS stopping *without* suppressing EOS logits, so exactly N_GREEDY plain argmax tokens come out.
    model.generation_config.eos_token_id = None
    gc = GenerationConfig(do_sample=False, max_new_tokens=N_GREEDY, eos_token_id=None, pad_token_id=pad_id,
                          bos_token_id=1, num_beams=1)
    out = model.generate(input_ids=input_ids[None], attention_mask=torch.ones_like(input_ids)[None],
                         pixel_values=pixel_values, generation_config=gc)
    new = out[0, input_ids.shape[0]:]
    assert new.shape[0] == N_GREEDY, new.shape
    # cross-check against argmax over full (no KV cache) re-forwards
    seq = input_ids.clone()
    for i in range(N_GREEDY):
        nxt = model(input_ids=seq[None], pixel_values=pixel_values).logits[0, -1].argmax()
        assert int(nxt) == int(new[i]), (i, int(nxt), int(new[i]))
        seq = torch.cat([seq, nxt[None]])
    return new.clone()


def maxdiff(a, b):
    return float((a.float() - b.float()).abs().max())


def run_variant(name, tokenizer):
    out_dir = os.path.join(HERE, name)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    variant = "gqa" if name == "llava_gqa" else "tied"
    strategy = "default" if variant == "gqa" else "full"
    n_img = 25 if variant == "gqa" else 26

    processor = build_processor(tokenizer, strategy)
    cfg = make_config(variant, tokenizer)
    model = new_model(cfg, seed=11 if variant == "gqa" else 22)
    print(f"[{name}] params: {sum(p.numel() for p in model.parameters())}")

    # processor / chat template / tokenizer files (as transformers 5.23 writes them)
    processor.save_pretrained(out_dir)
    if variant == "gqa":
        write_old_checkpoint(model, cfg, out_dir)
        to_old_processor_files(out_dir, tokenizer)
        ref_model = model
    else:
        model.to(torch.bfloat16).save_pretrained(out_dir)
        rewrite_new_layout(model, out_dir)
        ref_model = LlavaForConditionalGeneration(cfg).eval()  # in-memory reference: bf16-rounded weights
        ref_model.load_state_dict({k: v.float() for k, v in model.state_dict().items()}, strict=False)
        ref_model.tie_weights()
        model = None

    # ---- reload from disk exactly like a user would ----
    loaded, info = LlavaForConditionalGeneration.from_pretrained(out_dir, dtype=torch.float32,
                                                                  output_loading_info=True)
    loaded.eval()
    bad = {k: v for k, v in info.items() if v and k != "mismatched_keys" or (k == "mismatched_keys" and v)}
    assert not bad, f"loading problems: {bad}"
    proc2 = AutoProcessor.from_pretrained(out_dir)
    assert type(proc2.image_processor).__name__ == "CLIPImageProcessorPil", type(proc2.image_processor)
    assert loaded.config.vision_feature_layer == cfg.vision_feature_layer
    assert loaded.config.text_config.rope_parameters["rope_theta"] == cfg.text_config.rope_parameters["rope_theta"]
    assert loaded.config.text_config.num_key_value_heads == cfg.text_config.num_key_value_heads
    if variant == "tied":
        assert loaded.lm_head.weight.data_ptr() == loaded.model.language_model.embed_tokens.weight.data_ptr()

    image = Image.open(IMG_PATH)
    msgs1 = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the big square?"}]}]
    msgs2 = [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
             {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many circles are there?"}]}]
    assert proc2.apply_chat_template(msgs1, add_generation_prompt=True) == PROMPT_1
    assert proc2.apply_chat_template(msgs2, add_generation_prompt=True) == PROMPT_2

    enc1 = proc2(text=PROMPT_1, images=image, return_tensors="pt")
    enc2 = proc2(text=PROMPT_2, images=image, return_tensors="pt")
    enc1b = processor(text=PROMPT_1, images=image, return_tensors="pt")
    assert torch.equal(enc1["input_ids"], enc1b["input_ids"]) and torch.equal(enc1["pixel_values"], enc1b["pixel_values"])
    ids1, ids2 = enc1["input_ids"][0], enc2["input_ids"][0]
    pv = enc1["pixel_values"].float()
    assert torch.equal(pv, enc2["pixel_values"].float())
    assert pv.shape == (1, 3, 30, 30)
    image_id = cfg.image_token_id
    assert int((ids1 == image_id).sum()) == n_img and int((ids2 == image_id).sum()) == n_img
    assert int(ids1[0]) == 1 and int(ids2[0]) == 1

    # ---- outputs from the reloaded model; compare with the in-memory model ----
    ref = full_outputs(loaded, ids1, pv)
    mem = full_outputs(ref_model, ids1, pv)
    d_reload = maxdiff(ref["logits"], mem["logits"])
    print(f"[{name}] reload vs in-memory: max|dlogits| = {d_reload:.3e}")
    assert d_reload < 1e-5

    # ---- independent re-implementation from the files on disk ----
    sd = load_dir_weights(out_dir)
    mcfg = manual_cfg(loaded.config)
    man = manual_forward(sd, mcfg, ids1, pv)
    for k in ("logits", "image_features", "vision_hidden_states", "lm_hidden_states"):
        d = maxdiff(man[k], ref[k])
        print(f"[{name}] manual vs HF {k}: max|d| = {d:.3e}  shape {tuple(ref[k].shape)}")
        assert d < 2e-4, k
    man_il = manual_forward(sd, mcfg, ids1, pv, rope=rope_interleaved)
    d_il = maxdiff(man_il["logits"], ref["logits"])
    print(f"[{name}] RoPE check: interleaved-pair RoPE would differ by {d_il:.3f} (rotate-half matches)")
    assert d_il > 0.05
    with torch.no_grad():
        d_pos = maxdiff(loaded(input_ids=ids1[None], pixel_values=pv,
                               position_ids=torch.arange(ids1.shape[0])[None]).logits[0], ref["logits"])
    assert d_pos == 0.0, d_pos  # default positions are 0..L-1

    lg = ref["logits"]
    print(f"[{name}] logits max|x| = {lg.abs().max():.2f}, std over positions of argmax-row: "
          f"{lg.std(0).mean():.2f}, distinct argmax = {len(set(lg.argmax(-1).tolist()))}/{lg.shape[0]}")
    assert 4.0 < float(lg.abs().max()) < 30.0

    with torch.no_grad():
        logits2 = loaded(input_ids=ids2[None], pixel_values=pv).logits[0].float().contiguous()
    man2 = manual_forward(sd, mcfg, ids2, pv)
    assert maxdiff(man2["logits"], logits2) < 2e-4
    pad_id = cfg.pad_token_id
    g1 = greedy(loaded, ids1, pv, pad_id)
    g2 = greedy(loaded, ids2, pv, pad_id)

    # resized uint8 image (PIL bicubic, before centre crop), for checking the Rust resize on its own
    ip = proc2.image_processor
    arr = np.moveaxis(np.array(image.convert("RGB")), -1, 0)  # CHW uint8
    from transformers.image_utils import SizeDict
    resized = ip.resize(np.asarray(arr), SizeDict(shortest_edge=30), resample=ip.resample)
    resized = torch.from_numpy(np.ascontiguousarray(resized)).to(torch.uint8)
    # check the rest of the pipeline from it: centre crop, /255, mean/std
    top, left = (resized.shape[1] - 30) // 2, (resized.shape[2] - 30) // 2
    crop = resized[:, top:top + 30, left:left + 30].double() / 255.0
    mean = torch.tensor(ip.image_mean, dtype=torch.float64)[:, None, None]
    std = torch.tensor(ip.image_std, dtype=torch.float64)[:, None, None]
    assert maxdiff(((crop - mean) / std).float()[None], pv) < 1e-6

    tensors = {
        "input_ids": ids1.to(torch.int64).contiguous(),
        "pixel_values": pv.contiguous(),
        "image_resized_u8": resized.contiguous(),
        "logits": ref["logits"],
        "image_features": ref["image_features"],
        "vision_hidden_states": ref["vision_hidden_states"],
        "lm_hidden_states": ref["lm_hidden_states"],
        "greedy_ids": g1.to(torch.int64).contiguous(),
        "input_ids_2": ids2.to(torch.int64).contiguous(),
        "logits_2": logits2,
        "greedy_ids_2": g2.to(torch.int64).contiguous(),
    }
    ref_path = os.path.join(HERE, f"{name}_ref.safetensors")
    save_file(tensors, ref_path, metadata={  # one key: safetensors writes a metadata map in random order
        "generator": f"gen_llava.py torch {torch.__version__} transformers {transformers.__version__}"})
    tok = proc2.tokenizer
    first_img = int((ids1 == image_id).nonzero()[0])
    meta = {
        "checkpoint": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "image": "images/tiny_scene.png",
        "image_size_wh": list(image.size),
        "image_token": "<image>",
        "image_token_id": image_id,
        "pad_token_id": pad_id,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "vocab_size": TOTAL_VOCAB,
        "n_image_tokens": n_img,
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": strategy,
        "rope_theta": cfg.text_config.rope_parameters["rope_theta"],
        "rms_norm_eps": cfg.text_config.rms_norm_eps,
        "weights_dtype_on_disk": "float32" if variant == "gqa" else "bfloat16",
        "chat_template": LLAVA_CHAT_TEMPLATE,
        "prompts": {
            "1": {"text": PROMPT_1, "n_tokens": int(ids1.shape[0]), "first_image_pos": first_img,
                  "tokens": tok.convert_ids_to_tokens(ids1.tolist()),
                  "greedy_ids": g1.tolist(), "greedy_text": tok.decode(g1, skip_special_tokens=False)},
            "2": {"text": PROMPT_2, "n_tokens": int(ids2.shape[0]),
                  "first_image_pos": int((ids2 == image_id).nonzero()[0]),
                  "tokens": tok.convert_ids_to_tokens(ids2.tolist()),
                  "greedy_ids": g2.tolist(), "greedy_text": tok.decode(g2, skip_special_tokens=False)},
        },
        "checks": {"reload_vs_in_memory_max_abs_logits": d_reload,
                   "manual_reimpl_vs_hf_max_abs_logits": maxdiff(man["logits"], ref["logits"]),
                   "interleaved_rope_would_differ_by": d_il},
    }
    with open(os.path.join(HERE, f"{name}_ref.json"), "w") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)
        f.write("\n")
    print(f"[{name}] prompt1 {ids1.shape[0]} tokens, prompt2 {ids2.shape[0]} tokens; greedy1: {meta['prompts']['1']['greedy_text']!r}")
    return tensors


def main():
    make_image()
    tokenizer = build_tokenizer()
    run_variant("llava_gqa", tokenizer)
    run_variant("llava_tied", tokenizer)
    print("done")


if __name__ == "__main__":
    main()
