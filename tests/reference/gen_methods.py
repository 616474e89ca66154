#!/usr/bin/env python3
"""References for the peer pruning methods (issue 31) on the tiny LLaVA fixtures, each written from
its official code's logic on HF transformers' own modules (eager, f32).

DART:
Official code: github.com/ZichenWen1/DART, llava/model/language_model/modeling_llama_self.py
(`LlamaModel.forward` lines 333-357: before layer K, `last_layer_state = norm(output of layer K-1)`,
`any_states` = layer K-1's keys after RoPE; `get_retained_image_token` lines 397-449), defaults from
llava/eval/model_vqa_loader.py lines 172-179 (K = 2, 4 image + 4 text pivots). `retained()` below
follows get_retained_image_token statement by statement, Python `set`s included (their iteration
order decides which pivot picks first); the pruned sequence keeps the original position ids
(`position_ids = keep_indexs`).

PyramidDrop: stages after layers 1 and 2 of the 3-layer fixtures, LLaVA-NeXT Mistral's included (ratios 0.5,
0.25 of each prompt's image tokens, int()), each ranking by the
next layer's own projections of its input, the last prompt token's attention averaged over heads, and
renumbering the positions (modeling_llama_pdrop.py pdrop_forward, pdrop_rank_drop).

VisionZip: the CLS and the patches the CLS attends to most in the selected layer, then the rest merged
into evenly spaced targets by key similarity, before the projector (clip_encoder.py forward, 42-83).

FasterVLM: the `budget` patches the vision tower's CLS attends to most in the selected feature layer
(clip_encoder.py feature_select, llava_arch.py encode_images), the kept features in patch order.

Uniform pooling (the naive baseline, no official code): the projected patch features' g x g grid
through torch.nn.functional.adaptive_avg_pool2d to s x s, s = floor(sqrt(budget)) (as LLaVA-OneVision's
get_2dPool pools after the projector), the `full` strategy's CLS row kept in front; the prompt holds
that many image tokens and the LM runs unpruned on it.

LLaVA-NeXT (the three above, budget per tile): every tile of the image through the tower at once and
reduced on its own, then laid out as the official code lays it out, not as LLaVA-NeXT packs: FasterVLM's
llava_arch.py (prepare_inputs_labels_for_multimodal, lines 177-223: 'spatial' forced, so no unpadding
and no newlines; the base tile's kept rows, then the grid's kept patches as one feature map row by
row), VisionZip's llava_arch.py (prepare_inputs_labels_for_multimodal_visionzip, lines 91-121, and
restore_image_features_sorted, lines 42-80: the base tile's tokens, the grid's dominant patches as one
map row by row, the grid tiles' CLS tokens, their contextual tokens); pooling laid out as FasterVLM's.
The grid shape is HF's (get_anyres_image_grid_shape). Each row's (tile, patch) goes through the same
ops as the features (`shows`).

Reads llava_gqa/, llava_tied/ (gen_llava.py), llava_next_mistral/ (gen_llava_next.py) and their
*_ref.safetensors. Writes methods_ref.safetensors (`{case}/{kept, logits, greedy}`; pool cases:
`{case}/{input_ids, features, logits, greedy}`) and methods_ref.json (cases: method, fixture, prompt,
K, budget, pivots, N, first image position, kept; LLaVA-NeXT reductions: shows; `set_orders`: random integer lists and CPython's
`list(set(l))` of each, for the Rust emulation).

  /tmp/venv-ref/bin/python tests/reference/gen_methods.py     (a few seconds; deterministic)
"""
import functools
import json
import math
import os
import random
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

assert torch.__version__.split("+")[0] == "2.15.0", torch.__version__
assert transformers.__version__ == "5.23.0", transformers.__version__

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from gen_fastv import HFRunner  # noqa: E402
from gen_llava_next import NextRunner  # noqa: E402

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)

N_GREEDY = 24
K = 2
PIVOTS = (4, 4)
# (case, fixture, prompt key in the fixture's ref file, budget = max_num_trunction)
CASES = [
    ("dart_gqa_p1_m8", "llava_gqa", "input_ids", 8),
    ("dart_gqa_p1_m16", "llava_gqa", "input_ids", 16),
    ("dart_gqa_p2_m16", "llava_gqa", "input_ids_2", 16),
    ("dart_tied_p1_m8", "llava_tied", "input_ids", 8),
    ("dart_tied_p2_m16", "llava_tied", "input_ids_2", 16),
    ("dart_next_mistral_m64", "llava_next_mistral", "mistral/portrait", 64),
    ("dart_next_mistral_m128", "llava_next_mistral", "mistral/portrait", 128),
]
# (case, method, fixture, prompt key, budget): reductions before the LM
BEFORE_CASES = [
    ("pool_gqa_p1_k4", "pool", "llava_gqa", "input_ids", 4),
    ("pool_gqa_p2_k9", "pool", "llava_gqa", "input_ids_2", 9),
    ("pool_tied_p1_k4", "pool", "llava_tied", "input_ids", 4),
    ("pool_tied_p1_k16", "pool", "llava_tied", "input_ids", 16),
    ("fastervlm_gqa_p1_k5", "fastervlm", "llava_gqa", "input_ids", 5),
    ("fastervlm_gqa_p2_k12", "fastervlm", "llava_gqa", "input_ids_2", 12),
    ("visionzip_gqa_p1_k8", "visionzip", "llava_gqa", "input_ids", 8),
    ("visionzip_gqa_p2_k16", "visionzip", "llava_gqa", "input_ids_2", 16),
    # LLaVA-NeXT (budget per tile). FasterVLM and VisionZip read one feature layer's attention:
    # the Vicuna fixture's (-2); the Mistral one concatenates layers -3 and -1.
    ("pool_next_mistral_k4", "pool", "llava_next_mistral", "mistral/portrait", 4),
    ("pool_next_mistral_k9", "pool", "llava_next_mistral", "mistral/portrait", 9),
    ("fastervlm_next_vicuna_k6", "fastervlm", "llava_next_vicuna", "vicuna/landscape", 6),
    ("fastervlm_next_vicuna_k12", "fastervlm", "llava_next_vicuna", "vicuna/landscape", 12),
    ("visionzip_next_vicuna_k8", "visionzip", "llava_next_vicuna", "vicuna/landscape", 8),
    ("visionzip_next_vicuna_k16", "visionzip", "llava_next_vicuna", "vicuna/landscape", 16),
]


def retained(last_layer_state, any_states, start, length, budget, pivots):
    """get_retained_image_token (modeling_llama_self.py:397-449) with max_num_trunction = budget.
    last_layer_state [1, L, H]; any_states [1, kv_heads, L, d]. Returns the kept positions."""
    pivot_image_token, pivot_text_token = pivots
    TOKEN_TOPK = math.ceil(budget // (pivot_image_token + pivot_text_token))
    any_states = any_states.permute(0, 2, 1, 3).reshape(any_states.shape[0], any_states.shape[2], -1)
    k_image = any_states[0][start:start + length, :]
    k_query = any_states[0][start + length:, :]
    n_image = torch.norm(k_image, p=1, dim=-1)
    n_query = torch.norm(k_query, p=1, dim=-1)
    image_indices = (n_image.topk(pivot_image_token).indices + start).tolist()
    query_indices = (n_query.topk(pivot_text_token).indices + start + length).tolist()
    indices_set = set(image_indices + query_indices)
    valid_indices = set(range(start, start + length)) - set(image_indices)
    valid_indices_list = list(valid_indices)
    order = list(indices_set)
    for item in order:
        valid_vectors = last_layer_state[0][valid_indices_list, :]
        cos_sim = -torch.nn.functional.cosine_similarity(last_layer_state[0][item, :], valid_vectors, dim=-1)
        top_k_indices = cos_sim.topk(TOKEN_TOPK).indices
        top_k_real_indices = [valid_indices_list[i] for i in top_k_indices]
        indices_set.update(top_k_real_indices)
        valid_indices.difference_update(top_k_real_indices)
        valid_indices_list = list(valid_indices)
    indices_set.difference_update(query_indices)
    return sorted(indices_set), order, sorted(image_indices)


class KeyRunner:
    """Adds layer K-1's keys after RoPE to an HF layer-by-layer runner."""

    def __init__(self, runner):
        self.r = runner

    @torch.no_grad()
    def states_before(self, emb, k):
        """Runs layers 0..k-1 on the full sequence; returns (norm(output), keys after RoPE [1,kv,L,d])."""
        lm = self.r.lm
        L = emb.shape[1]
        pos = torch.arange(L)
        h = emb
        got = {}
        attn = lm.layers[k - 1].self_attn
        hook = attn.k_proj.register_forward_hook(lambda m, a, out: got.__setitem__("k", out))
        try:
            for i in range(k):
                h, _ = self.r.layer(i, h, pos)
        finally:
            hook.remove()
        d = attn.head_dim
        keys = got["k"].view(1, L, -1, d).transpose(1, 2)
        cos, sin = lm.rotary_emb(h, position_ids=pos[None])
        _, keys = apply_rotary_pos_emb(keys, keys, cos, sin)
        return lm.norm(h), keys


def pool_features(model, pv, budget):
    """adaptive_avg_pool2d of the projected g x g patch grid to floor(sqrt(budget))^2, CLS in front."""
    feats = torch.cat(model.model.get_image_features(pixel_values=pv, return_dict=True).pooler_output, 0)
    cls = 1 if model.config.vision_feature_select_strategy == "full" else 0
    g = model.config.vision_config.image_size // model.config.vision_config.patch_size
    side = max(1, math.isqrt(budget))
    grid = feats[cls:].reshape(g, g, -1).permute(2, 0, 1)[None]
    out = torch.nn.functional.adaptive_avg_pool2d(grid, side)[0].permute(1, 2, 0).reshape(side * side, -1)
    return torch.cat([feats[:cls], out], 0), None


def fastervlm_tiles(model, pv, budget):
    """FasterVLM (github.com/Theia-4869/FasterVLM): clip_encoder.py feature_select (lines 35-45,
    `attentions[select_layer][:, :, 0, 1:]` with select_feature 'patch') and llava_arch.py encode_images
    (lines 141-157: mean over heads, topk, index mask) on a batch of tiles: the projected features
    (B, N, D), the index masks (B, N) and the kept indices (B, T)."""
    layer = model.config.vision_feature_layer
    assert model.config.vision_feature_select_strategy == "default" and isinstance(layer, int)
    out = model.model.vision_tower(pv, output_attentions=True, output_hidden_states=True)
    att = out.attentions[layer][:, :, 0, 1:].mean(dim=1)  # (B, N)
    idx = torch.topk(att, k=budget, dim=1)[1]
    mask = torch.zeros_like(att, dtype=torch.bool)
    mask.scatter_(1, idx, True)
    feats = model.model.multi_modal_projector(out.hidden_states[layer][:, 1:])
    return feats, mask, idx


def fastervlm_features(model, pv, budget):
    """FasterVLM on one image: the projected features where the mask holds, in patch order."""
    feats, mask, idx = fastervlm_tiles(model, pv, budget)
    return feats[0][mask[0]], sorted(idx[0].tolist())


def visionzip_tiles(model, pv, budget):
    """VisionZip (github.com/dvlab-research/VisionZip): clip_encoder.py CLIPVisionTower_VisionZip.forward
    (lines 42-83) statement by statement on a batch of tiles, `metric` = the layer's raw keys averaged
    over heads (utils.py CLIPAttention_forward), then the projector (llava_arch.py
    encode_images_visionzip[_multi]). The budget splits as the README's settings: contextual =
    max(1, round(5k/32)), dominant = k - it (visionzip(model, dominant, contextual) passes dominant - 1
    patches: the CLS is the other). Returns the projected tokens (B, k, D) and all_indices (B, dominant)."""
    contextual_num = min(max(1, (5 * budget + 16) // 32), budget - 1)
    dominant_num = budget - contextual_num - 1
    layer = model.config.vision_feature_layer
    assert isinstance(layer, int)
    vt = model.model.vision_tower
    attn_mod = vt.encoder.layers[layer].self_attn  # 5.23: the vision tower holds the encoder itself
    got = {}
    hook = attn_mod.k_proj.register_forward_hook(lambda m, a, out: got.__setitem__("k", out))
    try:
        out = vt(pv, output_attentions=True, output_hidden_states=True)
    finally:
        hook.remove()
    bsz, t, _ = got["k"].shape
    metric = got["k"].view(bsz, t, attn_mod.num_heads, attn_mod.head_dim).transpose(1, 2).mean(1)
    attn_weights = out.attentions[layer]
    hidden_states = out.hidden_states[layer]
    # --- clip_encoder.py lines 50-80 ---
    cls_idx = 0
    cls_attention = attn_weights[:, :, cls_idx, cls_idx + 1:]
    cls_attention_sum = cls_attention.sum(dim=1)
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros((hidden_states.shape[0], 1), dtype=topk_indices.dtype), topk_indices], dim=1)
    mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
    dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(hidden_states.shape[0], dominant_num + 1, hidden_states.shape[2])
    metric_filtered = metric[mask].view(hidden_states.shape[0], hidden_states.shape[1] - (dominant_num + 1), metric.shape[2])
    hidden_states_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(hidden_states.shape[0], hidden_states.shape[1] - (dominant_num + 1), hidden_states.shape[2])
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    tokens_to_merge = metric_normalized[:, ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices), :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(tokens_to_merge.shape[0], tokens_to_merge.shape[1], contextual_num, dtype=hidden_states_filtered.dtype)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    hidden_to_merge = hidden_states_filtered[:, ~torch.isin(torch.arange(hidden_states_filtered.shape[1]), target_indices), :]
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_to_merge) / counts
    target_hidden = hidden_states_filtered[:, target_indices, :]
    contextual_tokens = target_hidden + aggregated_hidden
    hidden_states_save = torch.cat([dominant_tokens, contextual_tokens], dim=1)
    return model.model.multi_modal_projector(hidden_states_save), all_indices


def visionzip_features(model, pv, budget):
    """VisionZip on one image: its projected tokens and kept tower tokens (CLS and dominant)."""
    feats, all_indices = visionzip_tiles(model, pv, budget)
    return feats[0], sorted(all_indices[0].tolist())


def next_grid(model, image_size):
    """(num_patch_height, num_patch_width) of an image's tile grid, as HF tiles it."""
    c = model.config
    return get_anyres_image_grid_shape(image_size, c.image_grid_pinpoints, c.vision_config.image_size)


def labels(tiles, n, patches):
    """(tile, patch) labels [tiles, n, 2] (float64, exact) of each tile's rows, carried through the
    same ops as the features: `patches` ([n] or [tiles, n]) the rows' patches (-1: CLS, merged,
    pooled)."""
    lab = torch.empty(tiles, n, 2, dtype=torch.float64)
    lab[:, :, 0] = torch.arange(tiles, dtype=torch.float64)[:, None]
    lab[:, :, 1] = torch.as_tensor(patches, dtype=torch.float64)
    return lab


def spatial_layout(image_feature, index_mask, nph, npw, side):
    """FasterVLM llava_arch.py prepare_inputs_labels_for_multimodal lines 184-223 with
    mm_patch_merge_type = 'spatial' (forced, line 177): the base tile's masked rows, then the grid
    tiles' as one feature map, row by row, where the mask holds. No unpadding, no newlines."""
    base_image_feature = image_feature[0]
    base_index_mask = index_mask[0]
    image_feature = image_feature[1:]
    index_mask = index_mask[1:]
    height = width = side
    assert height * width == base_image_feature.shape[0]
    image_feature = image_feature.view(nph, npw, height, width, -1)
    index_mask = index_mask.view(nph, npw, height, width)
    image_feature = image_feature.permute(0, 2, 1, 3, 4).contiguous()
    index_mask = index_mask.permute(0, 2, 1, 3).contiguous()
    image_feature = image_feature.flatten(0, 3)
    index_mask = index_mask.flatten(0, 3)
    image_feature = image_feature[index_mask]
    base_image_feature = base_image_feature[base_index_mask]
    return torch.cat((base_image_feature, image_feature), dim=0)


def fastervlm_next(model, pv, image_size, budget):
    """FasterVLM on a LLaVA-NeXT image: encode_images on all its tiles at once (each keeps `budget`),
    then the 'spatial' layout; each row's (tile, patch) through the same ops."""
    feats, mask, _ = fastervlm_tiles(model, pv, budget)
    tiles, n = mask.shape
    nph, npw = next_grid(model, image_size)
    side = math.isqrt(n)
    out = spatial_layout(feats, mask, nph, npw, side)
    shows = spatial_layout(labels(tiles, n, range(n)), mask, nph, npw, side)
    return out, shows


def restore_image_features_sorted(image_feature, cur_keep_idx, width, height, side):
    """VisionZip llava_arch.py restore_image_features_sorted (lines 42-80) statement by statement,
    CLIP-L/336's 24 and 576 as `side` and side²; `image_newline_expanded` (line 66) is never used."""
    num_img, total_patches, feature_dim = image_feature.shape
    num_keep = cur_keep_idx.shape[1]
    num_extra = total_patches - num_keep
    cur_keep_idx_sorted, _ = cur_keep_idx.sort(dim=1)
    cur_keep_idx_sorted_restore = cur_keep_idx_sorted[:, 1:] - 1
    restored_features = torch.zeros((num_img, side * side, feature_dim), dtype=image_feature.dtype)
    mask = torch.zeros(num_img, side * side, dtype=torch.bool)
    mask.scatter_(1, cur_keep_idx_sorted_restore, True)
    kept_features = image_feature[:, 1:num_keep, :]
    restored_features[mask] = kept_features.reshape(-1, feature_dim)
    assert width * height == restored_features.shape[0], "width * height must equal num_img"
    restored_features = restored_features.view(height, width, side, side, feature_dim)
    restored_features = restored_features.permute(0, 2, 1, 3, 4).contiguous()
    restored_features = restored_features.view(height, side, width * side, feature_dim)
    restored_features = restored_features.view(height * side, width * side, feature_dim)
    grid_with_newline = restored_features
    mask = mask.view(height, width, side, side)
    mask = mask.permute(0, 2, 1, 3).contiguous()
    mask = mask.view(height * side, width * side)
    mask_all = mask
    image_feature_select = grid_with_newline[mask_all]
    raw_img_feature_merge = image_feature[:, -num_extra:, ].reshape(-1, feature_dim)
    cls_img_feature_merge = image_feature[:, 0, ]
    return torch.cat([image_feature_select, cls_img_feature_merge, raw_img_feature_merge])


def visionzip_next(model, pv, image_size, budget):
    """VisionZip on a LLaVA-NeXT image: llava_arch.py prepare_inputs_labels_for_multimodal_visionzip
    lines 91-121 ('spatial_unpad'): every tile through the tower at once (each keeps `budget`), the base
    tile's tokens as they come, then restore_image_features_sorted on the grid's; each row's
    (tile, patch) through the same ops."""
    feats, keep_idxs = visionzip_tiles(model, pv, budget)
    tiles, k, _ = feats.shape
    nph, npw = next_grid(model, image_size)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    dominant = keep_idxs.shape[1]
    # Each tile's rows: the CLS, its dominant patches in sequence order, the contextual tokens.
    patches = [[-1] + [int(i) - 1 for i in sorted(row.tolist())[1:]] + [-1] * (k - dominant) for row in keep_idxs]
    out, shows = (torch.cat((x[0], restore_image_features_sorted(x[1:], keep_idxs[1:], npw, nph, side)), dim=0)
                  for x in (feats, labels(tiles, k, patches)))
    return out, shows


def next_tile_features(model, pv):
    """LlavaNextModel.get_image_features before its packing (modeling_llava_next.py, 5.23, lines
    377-393): every tile's projected selected features, [tiles, g², D]."""
    c = model.config
    assert c.vision_feature_select_strategy == "default"
    out = model.model.vision_tower(pv, output_hidden_states=True)
    layer = c.vision_feature_layer
    if isinstance(layer, int):
        sel = out.hidden_states[layer]
    else:
        sel = torch.cat([out.hidden_states[i] for i in layer], dim=-1)
    return model.model.multi_modal_projector(sel[:, 1:])


def pool_next(model, pv, image_size, budget):
    """Uniform pooling on a LLaVA-NeXT image (no official code): every tile's g x g projected features
    through adaptive_avg_pool2d to s x s as a LLaVA-1.5 image's are, then FasterVLM's 'spatial' layout
    of the pooled tiles (base tile first, the grid's pooled map row by row; no unpadding, no newlines)."""
    feats = next_tile_features(model, pv)
    tiles, n, d = feats.shape
    g, side = math.isqrt(n), max(1, math.isqrt(budget))
    grid = feats.reshape(tiles, g, g, d).permute(0, 3, 1, 2)
    pooled = torch.nn.functional.adaptive_avg_pool2d(grid, side).permute(0, 2, 3, 1).reshape(tiles, side * side, d)
    nph, npw = next_grid(model, image_size)
    everything = torch.ones(tiles, side * side, dtype=torch.bool)
    out = spatial_layout(pooled, everything, nph, npw, side)
    shows = spatial_layout(labels(tiles, side * side, [-1] * side * side), everything, nph, npw, side)
    return out, shows


@torch.no_grad()
def before_case(model, ref, key, budget, method, tensors, meta, case, fixture):
    """The reduced image features, the prompt with that many image tokens, HF's forward on the
    merged embeddings, greedy by full recompute."""
    image_id = model.config.image_token_id
    shows = None
    if fixture.startswith("llava_next"):
        ids, pv, size = ref[f"{key}/input_ids"], ref[f"{key}/pixel_values"], ref[f"{key}/image_sizes"]
        reduced, shows = {"pool": pool_next, "fastervlm": fastervlm_next,
                          "visionzip": visionzip_next}[method](model, pv, size, budget)
        kept = None
    else:
        ids, pv = ref[key], ref["pixel_values"]
        reduced, kept = {"pool": pool_features, "fastervlm": fastervlm_features,
                         "visionzip": visionzip_features}[method](model, pv, budget)
    pos = (ids == image_id).nonzero()[:, 0]
    start, n = int(pos[0]), len(pos)
    new_ids = torch.cat([ids[:start], torch.full((reduced.shape[0],), image_id), ids[start + n:]])
    emb_layer = model.model.get_input_embeddings()

    def logits_of(seq):
        e = emb_layer(seq[None])
        mask = (seq == image_id)[None, :, None].expand_as(e)
        e = e.masked_scatter(mask, reduced)
        return model(inputs_embeds=e).logits[0]

    logits = logits_of(new_ids)
    seq, gen = new_ids.clone(), []
    for _ in range(N_GREEDY):
        nxt = int(logits_of(seq)[-1].argmax())
        gen.append(nxt)
        seq = torch.cat([seq, torch.tensor([nxt])])
    if kept is not None:
        tensors[f"{case}/kept"] = torch.tensor(kept, dtype=torch.int64)
    tensors[f"{case}/input_ids"] = new_ids.to(torch.int64).contiguous()
    tensors[f"{case}/features"] = reduced.float().contiguous()
    tensors[f"{case}/logits"] = logits.float().contiguous()
    tensors[f"{case}/greedy"] = torch.tensor(gen, dtype=torch.int64)
    meta["cases"][case] = {"method": method, "fixture": fixture, "prompt": key, "budget": budget,
                           "N": n, "n_after": int(reduced.shape[0]), "kept": kept, "greedy": gen}
    if shows is not None:
        # What each row shows: [tile, patch of the tile's g x g grid (-1: CLS, merged, pooled)].
        meta["cases"][case]["shows"] = [[int(t), int(p)] for t, p in shows.tolist()]
    print(f"[{case}] {n} image tokens reduced to {reduced.shape[0]}")


# (case, fixture, prompt key): PyramidDrop at layers 1 and 2 of the 3-layer fixtures, ratios 0.5, 0.25
PDROP_LAYERS, PDROP_RATIOS = [1, 2], [0.5, 0.25]
PDROP_CASES = [
    ("pdrop_gqa_p1", "llava_gqa", "input_ids"),
    ("pdrop_gqa_p2", "llava_gqa", "input_ids_2"),
    ("pdrop_tied_p1", "llava_tied", "input_ids"),
    ("pdrop_next_mistral", "llava_next_mistral", "mistral/portrait"),
]


@torch.no_grad()
def pdrop_forward(runner, emb, start, N, prompt_len, fixed=None):
    """PyramidDrop (github.com/Cooperx521/PyramidDrop, modeling_llama_pdrop.py: pdrop_forward lines
    1220-1268, pdrop_rank_drop 1291-1420): after layer idx, if idx + 1 is in the layer list, layer
    idx+1's input_layernorm, q_proj, k_proj and RoPE at the current positions; the last prompt token's
    attention (softmax over the keys it sees) averaged over heads, on the current image block; topk of
    int(N * ratio), sorted; positions renumbered 0..n. `fixed`: the kept lists of an earlier ranking
    (greedy recompute). The official code multiplies [heads] queries with [kv_heads] keys (MHA only);
    query head h reads kv head h // (heads / kv_heads) here, as attention does."""
    lm = runner.lm
    h, L = emb, emb.shape[1]
    pos = torch.arange(L)
    n_img, kept_lists = N, []
    for idx in range(runner.cfg.num_hidden_layers):
        h, _ = runner.layer(idx, h, pos)
        rank_layer = idx + 1
        if rank_layer not in PDROP_LAYERS:
            continue
        stage = PDROP_LAYERS.index(rank_layer)
        keep_len = int(N * PDROP_RATIOS[stage])
        if fixed is None:
            layer = lm.layers[rank_layer]
            attn = layer.self_attn
            xn = layer.input_layernorm(h)
            n, d = h.shape[1], attn.head_dim
            q = attn.q_proj(xn).view(1, n, -1, d).transpose(1, 2)
            k = attn.k_proj(xn).view(1, n, -1, d).transpose(1, 2)
            cos, sin = lm.rotary_emb(h, position_ids=pos[None])
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
            last = prompt_len - (N - n_img) - 1  # the last prompt token in the current sequence
            w = torch.matmul(q[0, :, last:last + 1], k[0].transpose(1, 2)) / math.sqrt(d)
            w[..., last + 1:] = float("-inf")
            w = torch.softmax(w, dim=-1, dtype=torch.float32)
            avg = w.mean(0)[:, start:start + n_img].mean(0)
            top = sorted(avg.topk(keep_len).indices.tolist())
        else:
            top = fixed[stage]
        kept_lists.append(top)
        keep = [start + t for t in top]
        h = torch.cat([h[:, :start], h[:, keep], h[:, start + n_img:]], dim=1)
        pos = torch.arange(h.shape[1])
        n_img = keep_len
    return lm_head_logits(runner, h), kept_lists


def lm_head_logits(runner, h):
    return runner.model.lm_head(runner.lm.norm(h))[0]


@torch.no_grad()
def pdrop_case(runner, ids, pv, tensors, meta, case, fixture, key):
    img_pos = (ids == runner.image_token_id).nonzero()[:, 0]
    start, N = int(img_pos[0]), len(img_pos)
    emb = runner.embeds(ids, pv)
    logits, kept = pdrop_forward(runner, emb, start, N, ids.shape[0])
    # kept indices among the prompt's image tokens, stage by stage
    orig, stages = list(range(N)), []
    for top in kept:
        orig = [orig[t] for t in top]
        stages.append(orig)
    seq, gen = ids.clone(), []
    for _ in range(N_GREEDY):
        lg, _ = pdrop_forward(runner, runner.embeds(seq, pv), start, N, ids.shape[0], fixed=kept)
        nxt = int(lg[-1].argmax())
        gen.append(nxt)
        seq = torch.cat([seq, torch.tensor([nxt])])
    for i, st in enumerate(stages):
        tensors[f"{case}/kept{i}"] = torch.tensor(st, dtype=torch.int64)
    tensors[f"{case}/logits"] = logits.float().contiguous()
    tensors[f"{case}/greedy"] = torch.tensor(gen, dtype=torch.int64)
    meta["cases"][case] = {"method": "pdrop", "fixture": fixture, "prompt": key, "N": N,
                           "layers": PDROP_LAYERS, "ratios": PDROP_RATIOS,
                           "kept": stages, "greedy": gen}
    print(f"[{case}] N={N} kept {[len(s) for s in stages]}")


# (case, fixture, prompt key, sparse layers (0-based, whose attention ranks), budgets)
SPARSE_CASES = [
    ("sparsevlm_gqa_p1", "llava_gqa", "input_ids", [0, 1], [12, 6]),
    ("sparsevlm_gqa_p2", "llava_gqa", "input_ids_2", [0, 1], [8, 3]),
    ("sparsevlm_tied_p1", "llava_tied", "input_ids", [1], [10]),
    ("sparsevlm_next_mistral", "llava_next_mistral", "mistral/portrait", [0, 1], [64, 24]),
    ("sparsevlm_next_mistral_b", "llava_next_mistral", "mistral/portrait", [1], [100]),
]


def cluster_and_merge(x, cluster_num):
    """SparseVLMs utils.py cluster_and_merge (lines 179-239), statement by statement, for B = 1,
    except the density noise (`torch.rand(...) * 1e-6`, there to break ties): a tie in density goes
    to the lower index instead (the Rust side's documented rule). Also returns each token's cluster
    and the centres, for the comparison."""
    B, N, C = x.shape
    x1 = x[:, :, None, :]  # ein.rearrange(x, "b l r -> b l () r")
    x2 = x[:, None, :, :]  # ein.rearrange(x, "b l r -> b () l r")
    dist_matrix = (x1 - x2).norm(dim=-1, p=2) / (C ** 0.5)
    dist_nearest, _ = torch.topk(dist_matrix, k=cluster_num, dim=-1, largest=False)
    density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
    idx = torch.arange(N)
    tie_lower = (density[:, None, :] == density[:, :, None]) & (idx[None, :] < idx[:, None])[None]
    mask = (density[:, None, :] > density[:, :, None]) | tie_lower
    mask = mask.type(x.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist, _ = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    score = dist * density
    # topk's order of equal scores is unspecified: the lower index first (a stable sort)
    index_down = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :cluster_num]
    dm = dist_matrix[0][index_down[0]][None]  # index_points
    idx_cluster = dm.argmin(dim=1)
    idx_cluster[0, index_down[0]] = torch.arange(cluster_num)
    token_weight = x.new_ones(B, N, 1)
    all_weight = token_weight.new_zeros(B * cluster_num, 1)
    all_weight.index_add_(dim=0, index=idx_cluster.reshape(B * N), source=token_weight.reshape(B * N, 1))
    all_weight = all_weight + 1e-6
    norm_weight = token_weight / all_weight[idx_cluster]
    x_merged = x.new_zeros(B * cluster_num, C)
    source = x * norm_weight
    x_merged.index_add_(dim=0, index=idx_cluster.reshape(B * N), source=source.reshape(B * N, C).type(x.dtype))
    return x_merged.reshape(B, cluster_num, C), idx_cluster[0].tolist(), index_down[0].tolist()


def stable_topk(v, k):
    """torch.topk's indices with equal values in index order (the Rust side's documented rule)."""
    return torch.sort(v, descending=True, stable=True).indices[:k]


@torch.no_grad()
def sparsevlm_forward(runner, emb, start, N, layers, budgets, fixed=None):
    """SparseVLM v1.0 (github.com/Gumpest/SparseVLMs, llava/model/language_model/
    modelling_sparse_llama.py LlamaDynamicvitModel.forward lines 185-360, score.py
    attn_postprocess_topk lines 23-45): raters from the input embeddings (lines 198-204); at each
    sparse layer the layer runs unpruned, its attention averaged over heads, the raters' rows to
    the visual block averaged over raters ranks; topk(min(budget, v - 1)) kept; of the pruned ones
    (ascending) the int(0.3 p) + 1 most related are clustered into int(n / 10) + 1 tokens placed
    after the kept ones; positions renumbered (line 302). `fixed`: (raters, per-stage (kept,
    candidates)) of an earlier run, for the greedy recompute. Returns logits and the choices."""
    h, pos = emb, torch.arange(emb.shape[1])
    v_start, v_num = start, N
    if fixed is None:
        v_t, t_t = emb[:, start:start + N], emb[:, start + N:]
        m = (v_t @ t_t.transpose(1, 2)).softmax(2).mean(1)
        t_idx = torch.where(m > m.mean())[1]
        choices = []
    else:
        t_idx, choices = fixed
    stages = []
    for idx in range(runner.cfg.num_hidden_layers):
        h, attn = runner.layer(idx, h, pos)
        if idx not in layers:
            continue
        s = layers.index(idx)
        text_start = v_start + v_num
        if fixed is None:
            rel = attn.mean(1)[:, t_idx + text_start, v_start:v_start + v_num].mean(1)[0]
            kept = sorted(stable_topk(rel, min(budgets[s], v_num - 1)).tolist())
            pruned = [i for i in range(v_num) if i not in set(kept)]
            n2 = int(len(pruned) * 0.3) + 1
            cand = [pruned[j] for j in stable_topk(rel[pruned], n2).tolist()]
            choices.append((kept, cand))
        else:
            kept, cand = choices[s]
        clusters = int(len(cand) / 10) + 1
        merged, assign, centres = cluster_and_merge(h[:, [v_start + c for c in cand]], clusters)
        stages.append({"kept": kept, "cand": cand, "assign": assign, "centres": centres})
        h = torch.cat([h[:, :v_start], h[:, [v_start + k for k in kept]], merged, h[:, v_start + v_num:]], dim=1)
        pos = torch.arange(h.shape[1])
        v_num = len(kept) + clusters
    return lm_head_logits(runner, h), (t_idx, choices), stages


@torch.no_grad()
def sparsevlm_case(runner, ids, pv_in, layers, budgets, tensors, meta, case, fixture, key):
    img_pos = (ids == runner.image_token_id).nonzero()[:, 0]
    start, N = int(img_pos[0]), len(img_pos)
    assert torch.equal(img_pos, torch.arange(start, start + N))
    emb = runner.embeds(ids, pv_in)
    logits, fixed, stages = sparsevlm_forward(runner, emb, start, N, layers, budgets)
    # Each visual token's id: the prompt's image-token index (a merged one: its centre's).
    ids_now, report = list(range(N)), []
    for st in stages:
        members = [sorted(ids_now[st["cand"][i]] for i, a in enumerate(st["assign"]) if a == k)
                   for k in range(len(st["centres"]))]
        kept = [ids_now[k] for k in st["kept"]]
        report.append({"kept": sorted(kept), "merged": members})
        ids_now = kept + [ids_now[st["cand"][c]] for c in st["centres"]]
    seq, gen = ids.clone(), []
    for _ in range(N_GREEDY):
        lg, _, _ = sparsevlm_forward(runner, runner.embeds(seq, pv_in), start, N, layers, budgets, fixed=fixed)
        nxt = int(lg[-1].argmax())
        gen.append(nxt)
        seq = torch.cat([seq, torch.tensor([nxt])])
    tensors[f"{case}/logits"] = logits.float().contiguous()
    tensors[f"{case}/greedy"] = torch.tensor(gen, dtype=torch.int64)
    raters = [start + N + int(t) for t in fixed[0]]
    meta["cases"][case] = {"method": "sparsevlm", "fixture": fixture, "prompt": key, "N": N,
                           "layers": layers, "budgets": budgets, "raters": raters,
                           "stages": report, "greedy": gen}
    print(f"[{case}] N={N} raters {len(raters)}; after stages "
          f"{[len(r['kept']) + len(r['merged']) for r in report]} "
          f"(merged {[len(r['merged']) for r in report]})")


def set_orders():
    rng = random.Random(31)
    out = []
    for n in [3, 8, 8, 8, 12, 20, 40]:
        for _ in range(6):
            hi = rng.choice([16, 100, 700, 5000])
            vals = [rng.randrange(hi) for _ in range(n)]
            out.append({"values": vals, "set_order": list(set(vals))})
    return out


@functools.lru_cache(maxsize=None)
def load_fixture(fixture):
    """A fixture's model (f32, eager attention) and its reference tensors, loaded once."""
    d = os.path.join(HERE, fixture)
    if fixture.startswith("llava_next"):
        m = LlavaNextForConditionalGeneration.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
        return m.eval(), load_file(os.path.join(HERE, "llava_next_ref.safetensors"))
    m = LlavaForConditionalGeneration.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    return m.eval(), load_file(os.path.join(HERE, f"{fixture}_ref.safetensors"))


def prompt_inputs(fixture, key):
    """A fixture prompt's runner, input ids and pixel values (LLaVA-NeXT's with its image size)."""
    model, ref = load_fixture(fixture)
    if fixture.startswith("llava_next"):
        runner = NextRunner(model, ref[f"{key}/image_sizes"][None])
        return runner, ref[f"{key}/input_ids"], ref[f"{key}/pixel_values"][None]
    return HFRunner(model), ref[key], ref["pixel_values"]


def main():
    tensors, meta = {}, {"generator": "gen_methods.py", "torch": torch.__version__,
                         "transformers": transformers.__version__, "K": K, "pivots": list(PIVOTS),
                         "cases": {}, "set_orders": set_orders()}
    for case, fixture, key, budget in CASES:
        runner, ids, pv_in = prompt_inputs(fixture, key)
        img_pos = (ids == runner.image_token_id).nonzero()[:, 0]
        start, N = int(img_pos[0]), len(img_pos)
        assert torch.equal(img_pos, torch.arange(start, start + N))
        emb = runner.embeds(ids, pv_in)
        normed, keys = KeyRunner(runner).states_before(emb, K)
        kept_pos, order, image_pivots = retained(normed, keys, start, N, budget, PIVOTS)
        L = ids.shape[0]
        drop = [p for p in range(start, start + N) if p not in set(kept_pos)]
        logits, _, _, _ = runner.run(emb, K, drop, False)
        seq = ids.clone()
        gen = []
        for _ in range(N_GREEDY):
            lg, _, _, _ = runner.run(runner.embeds(seq, pv_in), K, drop, False)
            nxt = int(lg[-1].argmax())
            gen.append(nxt)
            seq = torch.cat([seq, torch.tensor([nxt])])
        kept = [p - start for p in kept_pos]
        tensors[f"{case}/kept"] = torch.tensor(kept, dtype=torch.int64)
        tensors[f"{case}/logits"] = logits.float().contiguous()
        tensors[f"{case}/greedy"] = torch.tensor(gen, dtype=torch.int64)
        meta["cases"][case] = {"method": "dart", "fixture": fixture, "prompt": key, "budget": budget, "N": N, "L": L,
                               "first_image_pos": start, "kept": kept, "n_kept": len(kept),
                               "pivot_order": order, "image_pivots": image_pivots,
                               "pivot_order_is_sorted": order == sorted(order), "greedy": gen}
        print(f"[{case}] N={N} budget={budget} kept {len(kept)}; pivots visited {order}")
    for case, method, fixture, key, budget in BEFORE_CASES:
        model, ref = load_fixture(fixture)
        before_case(model, ref, key, budget, method, tensors, meta, case, fixture)
    for case, fixture, key in PDROP_CASES:
        pdrop_case(*prompt_inputs(fixture, key), tensors, meta, case, fixture, key)
    for case, fixture, key, layers, budgets in SPARSE_CASES:
        runner, ids, pv_in = prompt_inputs(fixture, key)
        sparsevlm_case(runner, ids, pv_in, layers, budgets, tensors, meta, case, fixture, key)
    save_file(dict(sorted(tensors.items())), os.path.join(HERE, "methods_ref.safetensors"),
              metadata={"generator": f"gen_methods.py torch {torch.__version__} transformers {transformers.__version__}"})
    with open(os.path.join(HERE, "methods_ref.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
