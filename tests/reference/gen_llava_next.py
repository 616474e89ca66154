#!/usr/bin/env python3
"""Generate two tiny random LLaVA-NeXT (LLaVA-1.6, any-resolution) checkpoints and reference outputs,
including FastV visual-token pruning on LLaVA-NeXT's packed image tokens.

Outputs (all under tests/reference/):
  images/square.png           64x64 RGB test scene (created once, then always read back)
  llava_next_vicuna/          checkpoint A: OLD (transformers 4.x, llava-hf v1.6) layout + config spellings:
                              `language_model.model.*`, `language_model.lm_head.weight`,
                              `vision_tower.vision_model.*`, `multi_modal_projector.*`, top-level
                              `image_newline`; LLaMA text (GQA 4q/2kv), untied, f32, 2 shards + index,
                              pinpoints SMALL, vision_feature_layer -2, strategy "default",
                              4.x processor files (preprocessor_config.json, processor_config.json,
                              chat_template.json, special_tokens_map.json, tokenizer files)
  llava_next_mistral/         checkpoint B: transformers 5.23 save_pretrained files, weights under the
                              5.x in-memory names (`model.language_model.*`, `model.vision_tower.*`,
                              `model.multi_modal_projector.*`, `model.image_newline`, `lm_head.weight`);
                              Mistral text (MQA 4q/1kv, head_dim 16, sliding_window null), untied, f32,
                              pinpoints WIDE, vision_feature_layer [-3, -1], strategy "default"
  llava_next_ref.safetensors  per case `{ckpt}/{img}/...` (input_ids, pixel_values, image_sizes,
                              image_features, logits, logits_rows, greedy) and per FastV case
                              `fastv/{ckpt}_{img}/...` (kept, scores, logits, logits_rows, greedy)
  llava_next_ref.json         prompts, grids, packing maps (tile_of, newline positions), FastV facts, checks

Both checkpoints use the tiny CLIP tower of gen_llava.py (image 30, patch 6 -> 5x5 patches per tile)
and gen_llava.build_tokenizer(); cases: {vicuna, mistral} x {landscape photo.png 397x291,
portrait tall.png 120x301, square square.png 64x64}.

Logit rows: the full [L, 512] logits of all cases do not fit the 4 MB fixture budget next to the two
checkpoints, so `logits` holds the rows listed in `logits_rows` (absolute positions of the sequence
the logits belong to): every non-image position, every LOGIT_IMAGE_STRIDE-th image token (image index
0, S, 2S, ...) and the last image token. `image_features` covers the image rows exactly.

FastV contract for LLaVA-NeXT (see the `fastv` section of the JSON): N = all image-token positions
(tile features and newline tokens); k = ceil(keep * N) (exact, gen_fastv.keep_count); importance =
mean over heads of layer K-1's eager attention A[h, L-1, pos_j]; keep_newlines=True pins the newline
tokens (stable sort on (not pinned, -score, index)), keep_newlines=False is plain FastV ((-score, index));
the pruned sequence keeps the original order and original RoPE positions; greedy = 24 tokens by full
recompute with the drop set fixed at prefill (gen_fastv's way).

Run:  /work/venv-chat/bin/python tests/reference/gen_llava_next.py      (about a minute; deterministic)
Pinned versions: see requirements.txt (torch 2.15.0 and transformers 5.23.0 asserted here and in the
imported gen_llava / gen_fastv; no torchvision, so the PIL image processors are used).
"""
import json
import os
import shutil
import sys
import types

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    MistralConfig,
)
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

assert torch.__version__.split("+")[0] == "2.15.0", torch.__version__
assert transformers.__version__ == "5.23.0", transformers.__version__
try:
    import torchvision  # noqa: F401
    raise AssertionError("torchvision must not be installed (see requirements.txt)")
except ImportError:
    pass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gen_llava  # noqa: E402
from gen_fastv import HFRunner, keep_count, manual_pruned, rank  # noqa: E402
from gen_llava import (  # noqa: E402
    LLAVA_CHAT_TEMPLATE, N_GREEDY, TOTAL_VOCAB, build_tokenizer, greedy, load_dir_weights, manual_cfg,
    maxdiff, randomize, to_old_processor_files, write_old_checkpoint,
)

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)

SMALL = [[30, 60], [60, 30], [60, 60], [30, 90], [90, 30]]
WIDE = [[60, 60], [60, 120], [120, 60], [90, 90]]
TILE, PATCH = 30, 6
SIDE = TILE // PATCH  # 5 patches per tile side
LOGIT_IMAGE_STRIDE = 8
SQUARE_PATH = os.path.join(HERE, "images", "square.png")
IMAGES = {  # name -> file under images/
    "landscape": "photo.png",  # 397x291 (w x h)
    "portrait": "tall.png",  # 120x301
    "square": "square.png",  # 64x64
}
QUESTIONS = {
    "landscape": "What color is the big square?",
    "portrait": "How many circles are there?",
    "square": "Where is the red triangle?",
}

# llava-hf/llava-v1.6-mistral-7b-hf's chat template. Source: the table of exact hub templates in
# openvino_tokenizers (COMPLEX_CHAT_TEMPLATES, entry "# llava-next"; its earlier "# llava-next old" entry
# had the typo '<\\s> ' instead of '</s> '), identical to transformers' own LLaVA-NeXT(-Video) converter
# template `chat_mistral` apart from the system branch. The user turn renders "[INST] <image>\n{text} [/INST]";
# there is no add_generation_prompt branch.
MISTRAL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> '}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# llava-hf/llava-v1.6-vicuna-7b-hf: its chat_template.json text could not be found in the reference
# corpora, so (as agreed) the llava-hf LLaVA-1.5 template of gen_llava.py is used; for a user turn with
# one image it renders "USER: <image>\n{text} ASSISTANT:" (the vicuna_v1 format LLaVA-1.6-vicuna uses).
VICUNA_CHAT_TEMPLATE = LLAVA_CHAT_TEMPLATE

CKPTS = {
    "vicuna": dict(dir="llava_next_vicuna", pins=SMALL, layer=-2, seed=35, template=VICUNA_CHAT_TEMPLATE,
                   template_source="gen_llava.LLAVA_CHAT_TEMPLATE (llava-hf/llava-1.5-7b-hf's; the exact "
                   "llava-v1.6-vicuna-7b-hf text was not found)",
                   prompt_fmt="USER: <image>\n{q} ASSISTANT:"),
    "mistral": dict(dir="llava_next_mistral", pins=WIDE, layer=[-3, -1], seed=37, template=MISTRAL_CHAT_TEMPLATE,
                    template_source="llava-hf/llava-v1.6-mistral-7b-hf chat_template.json as listed in "
                    "openvino_tokenizers' COMPLEX_CHAT_TEMPLATES ('# llava-next')",
                    prompt_fmt="[INST] <image>\n{q} [/INST]"),
}

# (ckpt, image, K, keep, keep_newlines)
FASTV_CASES = [
    ("vicuna", "landscape", 2, 0.5, True),
    ("vicuna", "portrait", 1, 0.25, True),
    ("vicuna", "square", 2, 0.5, False),
    ("mistral", "landscape", 1, 0.5, True),
    ("mistral", "portrait", 2, 0.11, True),
]


# ----------------------------------------------------------------------------------------------
# Image
# ----------------------------------------------------------------------------------------------
def make_square():
    """64x64 photo-like scene (like gen_llava.make_image): gradient, a big square, circles, a triangle, noise."""
    if os.path.exists(SQUARE_PATH):
        return
    rng = np.random.default_rng(64)
    W = H = 64
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    img = np.zeros((H, W, 3))
    img[..., 0] = 70 + 90 * yy / H
    img[..., 1] = 150 - 50 * xx / W
    img[..., 2] = 110 + 80 * (xx + yy) / (W + H)
    img[8:30, 36:58] = [220, 50, 40]  # big red square (top right)
    for cx, cy, r, col in [(14, 14, 7, [40, 80, 230]), (50, 48, 6, [245, 215, 45]), (30, 40, 4, [40, 205, 95])]:
        img[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = col
    tri = (yy >= 44) & (yy <= 60) & (np.abs(xx - 14) <= (yy - 44) * 0.7)
    img[tri] = [200, 30, 60]  # red triangle (bottom left)
    img += rng.normal(0, 8, img.shape)
    Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB").save(SQUARE_PATH, optimize=False)


# ----------------------------------------------------------------------------------------------
# Model / processor
# ----------------------------------------------------------------------------------------------
def make_config(name, tokenizer):
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    pad_id = tokenizer.convert_tokens_to_ids("<pad>")
    vision = CLIPVisionConfig(image_size=TILE, patch_size=PATCH, hidden_size=32, num_hidden_layers=3,
                              num_attention_heads=4, intermediate_size=64, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5, projection_dim=32)
    common = dict(vocab_size=TOTAL_VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                  hidden_act="silu", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=pad_id)
    if name == "vicuna":
        text = LlamaConfig(intermediate_size=128, num_key_value_heads=2, max_position_embeddings=512,
                           rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                           **common)
    else:
        text = MistralConfig(intermediate_size=160, num_key_value_heads=1, head_dim=16, sliding_window=None,
                             max_position_embeddings=1024, rms_norm_eps=1e-5,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **common)
    c = CKPTS[name]
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                          projector_hidden_act="gelu", vision_feature_select_strategy="default",
                          vision_feature_layer=c["layer"], multimodal_projector_bias=True,
                          tie_word_embeddings=False, image_grid_pinpoints=c["pins"])
    cfg.pad_token_id = pad_id
    return cfg


@torch.no_grad()
def new_model(cfg, seed):
    torch.manual_seed(seed)
    m = LlavaNextForConditionalGeneration(cfg).to(torch.float32).eval()
    # gen_llava.randomize on everything but image_newline (which it does not know), then image_newline
    skip = "model.image_newline"
    randomize(types.SimpleNamespace(named_parameters=lambda: [(n, p) for n, p in m.named_parameters() if n != skip]),
              seed)
    g = torch.Generator().manual_seed(seed + 1000)
    nl = m.model.image_newline
    nl.copy_(0.5 * torch.randn(nl.shape, generator=g, dtype=torch.float32))
    return m


def build_processor(tokenizer, name):
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                    image_grid_pinpoints=CKPTS[name]["pins"], do_pad=True)
    return LlavaNextProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=PATCH,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=CKPTS[name]["template"])


def dump_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def old_key_next(k):
    return "image_newline" if k == "model.image_newline" else OLD_KEY(k)


OLD_KEY = gen_llava.old_key


def write_vicuna(model, cfg, processor, tokenizer, out_dir):
    """4.x llava-hf v1.6 layout: gen_llava's old-layout writers with the top-level `image_newline` and the
    LLaVA-NeXT config / processor spellings."""
    processor.save_pretrained(out_dir)
    gen_llava.old_key = old_key_next  # write_old_checkpoint looks old_key up in its module
    try:
        write_old_checkpoint(model, cfg, out_dir)
    finally:
        gen_llava.old_key = OLD_KEY
    idx = json.load(open(os.path.join(out_dir, "model.safetensors.index.json")))
    assert idx["weight_map"]["image_newline"] == "model-00001-of-00002.safetensors"
    conf = json.load(open(os.path.join(out_dir, "config.json")))
    conf["architectures"] = ["LlavaNextForConditionalGeneration"]
    conf["model_type"] = "llava_next"
    conf["image_grid_pinpoints"] = cfg.image_grid_pinpoints
    conf["use_image_newline_parameter"] = True
    del conf["image_seq_length"]  # llava-hf v1.6 configs do not carry it
    assert conf["text_config"]["rope_theta"] == 10000.0 and conf["text_config"]["max_position_embeddings"] == 512
    assert conf["vision_feature_layer"] == -2 and conf["text_config"]["model_type"] == "llama"
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(conf, f, indent=2, sort_keys=True)
        f.write("\n")
    to_old_processor_files(out_dir, tokenizer)
    for fname in ("preprocessor_config.json", "processor_config.json", "tokenizer_config.json"):
        p = os.path.join(out_dir, fname)
        d = json.load(open(p))
        d["processor_class"] = "LlavaNextProcessor"
        if fname == "tokenizer_config.json":
            d["model_max_length"] = cfg.text_config.max_position_embeddings
        dump_json(p, d)
    pre = json.load(open(os.path.join(out_dir, "preprocessor_config.json")))
    assert pre["image_processor_type"] == "LlavaNextImageProcessor", pre["image_processor_type"]
    assert pre["image_grid_pinpoints"] == SMALL and pre["do_pad"] is True, pre
    assert pre["size"] == {"shortest_edge": TILE} and pre["crop_size"] == {"height": TILE, "width": TILE}


def write_mistral(model, processor, out_dir):
    """5.23 save_pretrained, then the weights rewritten under the in-memory state_dict names."""
    processor.save_pretrained(out_dir)
    model.save_pretrained(out_dir)
    path = os.path.join(out_dir, "model.safetensors")
    saved = load_file(path)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    assert len(saved) == len(sd), (len(saved), len(sd))
    as_saved = []
    for k, v in saved.items():  # same tensors under 5.23's reverse-converted names
        if k == "language_model.lm_head.weight":
            km = "lm_head.weight"
        elif k.startswith("language_model.model."):
            km = "model.language_model." + k[len("language_model.model."):]
        elif k.startswith("model.") or k == "lm_head.weight":
            km = k
        else:
            km = "model." + k
        assert torch.equal(sd[km], v), k
        as_saved.append(k)
    save_file(sd, path, metadata={"format": "pt"})
    conf = json.load(open(os.path.join(out_dir, "config.json")))
    assert conf["text_config"]["sliding_window"] is None and conf["text_config"]["model_type"] == "mistral", conf
    return sorted({k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("language_model") else "")
                   for k in as_saved})


class WithSizes:
    """Lets gen_llava.greedy drive LLaVA-NeXT: adds image_sizes to generate() and forward()."""

    def __init__(self, model, image_sizes):
        self.m, self.sizes = model, image_sizes
        self.generation_config = model.generation_config

    def generate(self, **kw):
        return self.m.generate(image_sizes=self.sizes, **kw)

    def __call__(self, **kw):
        return self.m(image_sizes=self.sizes, **kw)


class NextRunner(HFRunner):
    """gen_fastv.HFRunner with LlavaNextModel.forward's merge (get_image_features with image_sizes)."""

    def __init__(self, model, image_sizes):
        super().__init__(model)
        self.image_sizes = image_sizes

    @torch.no_grad()
    def embeds(self, ids, pixel_values):
        m = self.model.model
        inputs_embeds = m.get_input_embeddings()(ids[None])
        feats = m.get_image_features(pixel_values, self.image_sizes, return_dict=True).pooler_output
        feats = torch.cat(feats, dim=0).to(inputs_embeds.dtype)
        mask = m.get_placeholder_mask(ids[None], inputs_embeds=inputs_embeds, image_features=feats)
        return inputs_embeds.masked_scatter(mask, feats)


# ----------------------------------------------------------------------------------------------
# Independent any-resolution packing (plain torch/python; no HF helpers)
# ----------------------------------------------------------------------------------------------
def best_resolution(h, w, pins):
    """LLaVA-NeXT's rule: max effective (downscaled) resolution, then min wasted area; first wins ties."""
    best, best_eff, best_waste = None, -1, None
    for ph, pw in pins:
        scale = min(pw / w, ph / h)
        dw, dh = int(w * scale), int(h * scale)
        eff = min(dw * dh, w * h)
        waste = ph * pw - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = [ph, pw], eff, waste
    return best


def pack_plan(h, w, pins):
    """Grid and the packed order of LLaVA-NeXT's image tokens: a list of (kind, tile, row, col) with
    kind 'base' (tile 0, patch row/col), 'grid' (tile 1.., row/col in the full grid map) or 'newline'."""
    bh, bw = best_resolution(h, w, pins)
    gh, gw = bh // TILE, bw // TILE
    H, W = gh * SIDE, gw * SIDE
    r0, r1, c0, c1 = 0, H, 0, W
    if w / h > W / H:  # wider than the map: rows were padded
        new_h = int(round(h * (W / w), 7))
        pad = (H - new_h) // 2
        r0, r1 = pad, H - pad
    else:
        new_w = int(round(w * (H / h), 7))
        pad = (W - new_w) // 2
        c0, c1 = pad, W - pad
    plan = [("base", 0, r, c) for r in range(SIDE) for c in range(SIDE)]
    for r in range(r0, r1):
        for c in range(c0, c1):
            plan.append(("grid", 1 + (r // SIDE) * gw + (c // SIDE), r, c))
        plan.append(("newline", -1, r, -1))
    return dict(best=[bh, bw], grid=[gh, gw], rows=[r0, r1], cols=[c0, c1], plan=plan)


def pack_manual(tile_feats, plan, newline):
    """tile_feats [1 + gh*gw, 25, D] (row-major patches per tile) -> packed [N, D] following the plan."""
    gw = plan["grid"][1]
    out = []
    for kind, t, r, c in plan["plan"]:
        if kind == "base":
            out.append(tile_feats[0, r * SIDE + c])
        elif kind == "grid":
            tr, tc = r // SIDE, c // SIDE
            assert t == 1 + tr * gw + tc
            out.append(tile_feats[t, (r % SIDE) * SIDE + (c % SIDE)])
        else:
            out.append(newline)
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------
def logit_rows(is_image):
    """Absolute positions whose logits are stored: all non-image positions, every LOGIT_IMAGE_STRIDE-th
    image token (counting image tokens from 0) and the last image token."""
    img = [i for i, b in enumerate(is_image) if b]
    keep_img = set(img[::LOGIT_IMAGE_STRIDE]) | {img[-1]}
    return [i for i, b in enumerate(is_image) if not b or i in keep_img]


def load_checked(out_dir, **kw):
    m, info = LlavaNextForConditionalGeneration.from_pretrained(out_dir, dtype=torch.float32,
                                                                 output_loading_info=True, **kw)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"loading problems: {bad}"
    return m.eval()


def run_checkpoint(name, tokenizer, tensors, meta):
    c = CKPTS[name]
    out_dir = os.path.join(HERE, c["dir"])
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    cfg = make_config(name, tokenizer)
    model = new_model(cfg, c["seed"])
    tokenizer.model_max_length = cfg.text_config.max_position_embeddings  # 256 in gen_llava; L reaches 291
    processor = build_processor(tokenizer, name)
    print(f"[{name}] params: {sum(p.numel() for p in model.parameters())}")
    saved_prefixes = None
    if name == "vicuna":
        write_vicuna(model, cfg, processor, tokenizer, out_dir)
    else:
        saved_prefixes = write_mistral(model, processor, out_dir)

    # ---- reload exactly like a user ----
    loaded = load_checked(out_dir)
    eager = load_checked(out_dir, attn_implementation="eager")
    proc = AutoProcessor.from_pretrained(out_dir)
    assert type(proc).__name__ == "LlavaNextProcessor", type(proc)
    assert type(proc.image_processor).__name__ == "LlavaNextImageProcessorPil", type(proc.image_processor)
    assert proc.image_processor.image_grid_pinpoints == c["pins"]
    assert proc.chat_template == c["template"]
    lc = loaded.config
    assert lc.vision_feature_layer == c["layer"] and lc.image_grid_pinpoints == c["pins"]
    assert lc.vision_feature_select_strategy == "default"
    assert lc.text_config.model_type == ("llama" if name == "vicuna" else "mistral")
    assert lc.text_config.num_key_value_heads == cfg.text_config.num_key_value_heads
    assert lc.text_config.rope_parameters["rope_theta"] == cfg.text_config.rope_parameters["rope_theta"]
    assert lc.text_config.max_position_embeddings == cfg.text_config.max_position_embeddings
    if name == "mistral":
        assert lc.text_config.sliding_window is None and lc.text_config.head_dim == 16
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert loaded.lm_head.weight.data_ptr() != loaded.model.language_model.embed_tokens.weight.data_ptr()

    sd = load_dir_weights(out_dir)
    mc = manual_cfg(lc)
    image_id = lc.image_token_id
    pad_id = cfg.pad_token_id
    R = NextRunner(eager, None)
    ckpt_meta = {
        "dir": c["dir"], "layout": "transformers-4.x llava-hf v1.6 (2 shards)" if name == "vicuna"
        else "transformers-5.23 save_pretrained files, in-memory key names",
        "text_model_type": lc.text_config.model_type, "image_grid_pinpoints": c["pins"],
        "vision_feature_layer": c["layer"], "vision_feature_select_strategy": "default",
        "image_token_id": image_id, "pad_token_id": pad_id, "bos_token_id": 1, "eos_token_id": 2,
        "vocab_size": TOTAL_VOCAB, "tile": TILE, "patch": PATCH, "patches_per_tile_side": SIDE,
        "rope_theta": lc.text_config.rope_parameters["rope_theta"], "rms_norm_eps": lc.text_config.rms_norm_eps,
        "num_key_value_heads": lc.text_config.num_key_value_heads, "head_dim": 16,
        "chat_template": c["template"], "chat_template_source": c["template_source"],
    }
    if saved_prefixes:
        ckpt_meta["save_pretrained_key_prefixes_before_rewrite"] = saved_prefixes
    meta["checkpoints"][name] = ckpt_meta

    for img_name, fname in IMAGES.items():
        key = f"{name}/{img_name}"
        image = Image.open(os.path.join(HERE, "images", fname))
        w, h = image.size
        q = QUESTIONS[img_name]
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
        prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
        assert prompt == c["prompt_fmt"].format(q=q), prompt
        enc = proc(text=prompt, images=image, return_tensors="pt")
        ids = enc["input_ids"][0]
        pv5 = enc["pixel_values"]
        sizes = enc["image_sizes"]
        assert sizes.tolist() == [[h, w]], sizes
        # pixel values: the processor from disk == a fresh LlavaNextImageProcessorPil == gen_anyres' fixtures
        ip = LlavaNextImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                        image_grid_pinpoints=c["pins"])
        pv_direct = torch.from_numpy(ip(images=image.convert("RGB"), return_tensors="np")["pixel_values"])
        assert torch.equal(pv5, pv_direct), key
        pv = pv5[0].float().contiguous()  # [tiles, 3, 30, 30]
        anyres = os.path.join(HERE, "anyres_ref.safetensors")  # gen_anyres.py: same settings, same images
        akey = {"photo.png": "photo", "tall.png": "tall"}.get(fname)
        if akey and os.path.exists(anyres):
            ref_pv = load_file(anyres)[f"{akey}_{'small' if name == 'vicuna' else 'wide'}/pixel_values"]
            assert torch.equal(ref_pv, pv), key
            meta["checks"][f"{key}_pixel_values_equal_anyres_ref"] = True

        plan = pack_plan(h, w, c["pins"])
        best = list(select_best_resolution((h, w), c["pins"]))
        assert best == plan["best"], (best, plan["best"])
        gh, gw = plan["grid"]
        assert pv.shape == (1 + gh * gw, 3, TILE, TILE), pv.shape
        n_tok = int((ids == image_id).sum())
        n_proc = proc._get_number_of_features(h, w, TILE, TILE) - 1  # `default`: no CLS
        N = len(plan["plan"])
        assert n_tok == n_proc == N, (n_tok, n_proc, N)
        img_pos = (ids == image_id).nonzero()[:, 0]
        first = int(img_pos[0])
        assert torch.equal(img_pos, torch.arange(first, first + N)), "image run not contiguous"
        assert int(ids[0]) == 1

        # ---- HF features; independent packing check ----
        with torch.no_grad():
            feats = loaded.model.get_image_features(pv5, sizes, return_dict=True).pooler_output
            assert len(feats) == 1
            feats = feats[0].float().contiguous()
            assert feats.shape == (N, 64), feats.shape
            vt = loaded.model.vision_tower(pv, output_hidden_states=True)
            layers = c["layer"] if isinstance(c["layer"], list) else [c["layer"]]
            sel = torch.cat([vt.hidden_states[i] for i in layers], -1)[:, 1:]  # drop CLS
            tile_feats = loaded.model.multi_modal_projector(sel)  # [1 + gh*gw, 25, 64]
        packed = pack_manual(tile_feats, plan, loaded.model.image_newline.detach())
        d_pack = maxdiff(packed, feats)
        assert d_pack == 0.0, (key, d_pack)
        tile_of = [t for _, t, _, _ in plan["plan"]]
        newlines = [i for i, t in enumerate(tile_of) if t == -1]

        # ---- logits (reloaded f32 model, default attention) ----
        with torch.no_grad():
            out = loaded(input_ids=ids[None], pixel_values=pv5, image_sizes=sizes)
            logits = out.logits[0].float().contiguous()
            logits4 = loaded(input_ids=ids[None], pixel_values=pv, image_sizes=sizes).logits[0]
            mem = model(input_ids=ids[None], pixel_values=pv5, image_sizes=sizes).logits[0]
            full_e = eager(input_ids=ids[None], pixel_values=pv5, image_sizes=sizes, output_hidden_states=True)
        assert maxdiff(logits4, logits) == 0.0  # 4-D (stacked tiles) input == 5-D processor output
        d_mem = maxdiff(mem, logits)
        assert d_mem < 1e-5, d_mem
        R.image_sizes = sizes
        emb = R.embeds(ids, pv)
        assert maxdiff(emb[0], full_e.hidden_states[0][0]) == 0.0, "embedding merge differs from HF's"
        d_feat_eager = maxdiff(emb[0, img_pos], feats)  # eager vs sdpa CLIP attention
        assert d_feat_eager < 1e-5, d_feat_eager
        d_eager = maxdiff(full_e.logits[0], logits)
        man_logits, _ = manual_pruned(sd, mc, emb, mc["text"]["layers"], [], False)  # independent LM forward
        d_man = maxdiff(man_logits, logits)
        assert d_eager < 5e-5 and d_man < 1e-4, (d_eager, d_man)
        lg_abs = float(logits.abs().max())
        assert 3.0 < lg_abs < 40.0, lg_abs

        g = greedy(WithSizes(loaded, sizes), ids, pv5, pad_id)  # EOS disabled; cross-checked by recompute
        rows = logit_rows((ids == image_id).tolist())

        tensors[f"{key}/input_ids"] = ids.to(torch.int64).contiguous()
        tensors[f"{key}/pixel_values"] = pv
        tensors[f"{key}/image_sizes"] = sizes[0].to(torch.int64).contiguous()
        tensors[f"{key}/image_features"] = feats
        tensors[f"{key}/logits_rows"] = torch.tensor(rows, dtype=torch.int64)
        tensors[f"{key}/logits"] = logits[rows].contiguous()
        tensors[f"{key}/greedy"] = g.to(torch.int64).contiguous()
        tok = proc.tokenizer
        meta["cases"][key] = {
            "ckpt": name, "image": f"images/{fname}", "image_size_hw": [h, w], "prompt": prompt,
            "n_tokens": int(ids.shape[0]), "n_image_tokens": N, "processor_image_tokens": n_proc,
            "first_image_pos": first, "best_resolution_hw": best, "grid_hw": [gh, gw], "tiles": 1 + gh * gw,
            "feature_map_hw": [gh * SIDE, gw * SIDE], "unpadded_rows": plan["rows"], "unpadded_cols": plan["cols"],
            "unpadded_hw": [plan["rows"][1] - plan["rows"][0], plan["cols"][1] - plan["cols"][0]],
            "newline_positions": newlines, "tile_of": tile_of,
            "tokens": tok.convert_ids_to_tokens(ids.tolist()),
            "greedy_ids": g.tolist(), "greedy_text": tok.decode(g, skip_special_tokens=False),
            "n_logits_rows": len(rows),
            "checks": {"packing_manual_vs_hf_max_abs": d_pack, "reload_vs_in_memory_max_abs_logits": d_mem,
                       "eager_vs_sdpa_max_abs_logits": d_eager, "eager_vs_sdpa_max_abs_features": d_feat_eager,
                       "manual_lm_on_eager_embeds_vs_stored_logits_max_abs": d_man},
        }
        print(f"[{key}] {w}x{h} (w x h) -> best {best} grid {gh}x{gw} unpadded "
              f"{meta['cases'][key]['unpadded_hw']} N={N} L={ids.shape[0]} first_img={first} "
              f"|logits|max={lg_abs:.1f} greedy={meta['cases'][key]['greedy_text']!r}")

        if name == "vicuna" and img_name == "landscape":  # HF's behaviour with the `full` strategy
            try:
                with torch.no_grad():
                    r = loaded.model.get_image_features(pv5, sizes, vision_feature_select_strategy="full",
                                                        return_dict=True).pooler_output
                res = {"raises": False, "behaviour": f"returned packed features of shape {tuple(r[0].shape)}"}
            except Exception as e:  # noqa: BLE001
                res = {"raises": True, "exception": type(e).__name__, "message": str(e)}
            res["note"] = ("vision_feature_select_strategy='full' keeps CLS: each tile has 26 = 5*5+1 tokens, "
                           "pack_image_features views the grid tiles as (gh, gw, 5, 5, -1)")
            res["processor_count_full"] = proc._get_number_of_features(h, w, TILE, TILE)
            meta["checks"]["full_strategy"] = res
            print(f"[{key}] full strategy: {res}")

        # ---- FastV cases on this (ckpt, image) ----
        for ck, im, K, keep, keep_nl in FASTV_CASES:
            if (ck, im) == (name, img_name):
                run_fastv(R, sd, mc, name, img_name, ids, pv, prompt, K, keep, keep_nl, newlines, img_pos,
                          full_e, tensors, meta, proc.tokenizer)


def run_fastv(R, sd, mc, name, img_name, ids, pv, prompt, K, keep, keep_nl, newlines, img_pos, full_e,
              tensors, meta, tok):
    pre = f"{name}_{img_name}"
    L = ids.shape[0]
    N = len(img_pos)
    emb = R.embeds(ids, pv)
    # layer-loop sanity (HF modules) vs HF's eager forward, and hooked attention vs output_attentions
    with torch.no_grad():
        full_a = R.model(input_ids=ids[None], pixel_values=pv, image_sizes=R.image_sizes, output_attentions=True)
    lg_all, _, _, _ = R.run(emb, R.cfg.num_hidden_layers, [], False)
    assert maxdiff(lg_all, full_e.logits[0]) < 1e-5
    _, attn, _, _ = R.run(emb, K, [], False)
    assert maxdiff(attn, full_a.attentions[K - 1][0]) == 0.0
    attn_last = attn[:, L - 1, img_pos]  # [H, N]
    scores = attn_last.mean(0)
    k = keep_count(keep, N)
    s = scores.tolist()
    pinned = set(newlines) if keep_nl else set()
    order = sorted(range(N), key=lambda i: (i not in pinned, -s[i], i))
    if not keep_nl:
        assert order == rank(scores)
    assert k > len(pinned), "budget smaller than the pinned newlines"
    kept = sorted(order[:k])
    dropped = sorted(order[k:])
    assert pinned <= set(kept)
    gap = s[order[k - 1]] - s[order[k]] if k < N else None
    rel = None
    if gap is not None:
        assert order[k - 1] not in pinned and order[k] not in pinned
        rel = gap / abs(s[order[k - 1]])
        assert gap > 0 and rel > 1e-4, f"{pre}: boundary gap too small ({gap:.3e}, rel {rel:.3e})"
    drop_abs = [int(img_pos[j]) for j in dropped]
    logits, _, pos_ids, keep_pos = R.run(emb, K, drop_abs, False)
    Lp = L - len(drop_abs)
    assert logits.shape == (Lp, TOTAL_VOCAB) and torch.equal(pos_ids, keep_pos)
    man_logits, man_row = manual_pruned(sd, mc, emb, K, drop_abs, False)
    d_man = maxdiff(man_logits, logits)
    d_score = maxdiff(man_row[:, img_pos].mean(0), scores)
    assert d_man < 1e-4 and d_score < 1e-6, (d_man, d_score)
    # greedy: full recompute, drop set fixed at prefill
    seq = ids.clone()
    gen = []
    for _ in range(N_GREEDY):
        lg, _, _, _ = R.run(R.embeds(seq, pv), K, drop_abs, False)
        nxt = int(lg[-1].argmax())
        gen.append(nxt)
        seq = torch.cat([seq, torch.tensor([nxt])])
    img_set = set(img_pos.tolist())
    rows = logit_rows([int(p) in img_set for p in keep_pos])  # rows of the pruned sequence
    tensors[f"fastv/{pre}/kept"] = torch.tensor(kept, dtype=torch.int64)
    tensors[f"fastv/{pre}/scores"] = scores.float().contiguous()
    tensors[f"fastv/{pre}/logits_rows"] = torch.tensor(rows, dtype=torch.int64)
    tensors[f"fastv/{pre}/logits"] = logits[rows].float().contiguous()
    tensors[f"fastv/{pre}/greedy"] = torch.tensor(gen, dtype=torch.int64)
    srt = sorted(s, reverse=True)
    meta["fastv"][pre] = {
        "ckpt": name, "image": img_name, "prompt": prompt, "K": K, "keep": keep, "keep_newlines": keep_nl,
        "query_strategy": "last_token", "head_strategy": "sum", "renumber": False,
        "N": N, "k": k, "n_kept": len(kept), "n_newlines": len(newlines),
        "n_kept_newlines": len(set(kept) & set(newlines)),
        "kept": kept, "newline_indices": newlines, "L": L, "L_pruned": Lp, "first_image_pos": int(img_pos[0]),
        "kept_positions": [int(img_pos[j]) for j in kept],
        "boundary_gap": gap, "boundary_gap_rel": rel,
        "min_adjacent_score_gap": min(a - b for a, b in zip(srt, srt[1:])),
        "manual_reimpl_max_abs_logits": d_man, "manual_reimpl_max_abs_scores": d_score,
        "greedy_ids": gen, "greedy_text": tok.decode(gen, skip_special_tokens=False), "n_logits_rows": len(rows),
    }
    print(f"[fastv {pre}] K={K} keep={keep} newlines={'kept' if keep_nl else 'free'}: N={N} k={k} "
          f"(newlines {len(newlines)}, kept {len(set(kept) & set(newlines))}) L={L} L'={Lp} "
          f"gap rel {rel:.3e} manual d={d_man:.2e}/{d_score:.2e} greedy={meta['fastv'][pre]['greedy_text']!r}")


def main():
    make_square()
    tokenizer = build_tokenizer()
    tensors = {}
    meta = {
        "generator": "gen_llava_next.py", "torch": torch.__version__, "transformers": transformers.__version__,
        "n_greedy": N_GREEDY, "logit_image_stride": LOGIT_IMAGE_STRIDE,
        "logits_rows_rule": "all non-image positions + image tokens with image index % stride == 0 + the last "
                            "image token (positions in the sequence the logits belong to; FastV: the pruned one)",
        "tile_of_rule": "per image token: 0 = base image, 1 + (r // 5) * grid_w + (c // 5) for the unpadded "
                        "map's cell (r, c) in full-grid coordinates, -1 = image_newline",
        "tensors": {
            "{ckpt}/{img}/input_ids": "i64 [L]",
            "{ckpt}/{img}/pixel_values": "f32 [tiles, 3, 30, 30] (tile 0 = base image, then the grid row-major)",
            "{ckpt}/{img}/image_sizes": "i64 [2] (h, w)",
            "{ckpt}/{img}/image_features": "f32 [N, 64] packed features (get_image_features pooler_output)",
            "{ckpt}/{img}/logits_rows": "i64 [R] positions of the stored logits rows",
            "{ckpt}/{img}/logits": "f32 [R, 512] reloaded f32 model, rows logits_rows",
            "{ckpt}/{img}/greedy": "i64 [24] greedy ids, EOS disabled",
            "fastv/{ckpt}_{img}/kept": "i64 [k] kept image-token indices 0..N-1, ascending",
            "fastv/{ckpt}_{img}/scores": "f32 [N] mean over heads of layer K-1's A[h, L-1, image pos]",
            "fastv/{ckpt}_{img}/logits_rows": "i64 [R'] rows (indices in the pruned sequence) stored",
            "fastv/{ckpt}_{img}/logits": "f32 [R', 512] pruned-sequence logits, rows logits_rows",
            "fastv/{ckpt}_{img}/greedy": "i64 [24] greedy ids, full recompute, drop set fixed at prefill",
        },
        "checkpoints": {}, "cases": {}, "fastv": {}, "checks": {},
    }
    for name in CKPTS:
        run_checkpoint(name, tokenizer, tensors, meta)
    grids = {tuple(v["grid_hw"]) for v in meta["cases"].values()}
    assert len(grids) >= 3, grids
    meta["checks"]["distinct_grids"] = sorted(list(g) for g in grids)
    tensors = dict(sorted(tensors.items()))
    ref = os.path.join(HERE, "llava_next_ref.safetensors")
    save_file(tensors, ref, metadata={"generator": f"gen_llava_next.py torch {torch.__version__} "
                                                   f"transformers {transformers.__version__}"})
    dump_json(os.path.join(HERE, "llava_next_ref.json"), meta)
    total = 0
    for p in [ref, os.path.join(HERE, "llava_next_ref.json"), SQUARE_PATH]:
        total += os.path.getsize(p)
    for d in (CKPTS["vicuna"]["dir"], CKPTS["mistral"]["dir"]):
        for f in os.listdir(os.path.join(HERE, d)):
            total += os.path.getsize(os.path.join(HERE, d, f))
    print(f"wrote {len(tensors)} tensors; ref {os.path.getsize(ref)} bytes; all new fixtures {total} bytes")
    assert total < 4_000_000, total
    print("done")


if __name__ == "__main__":
    main()
