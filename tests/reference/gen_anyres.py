#!/usr/bin/env python3
"""LLaVA-NeXT any-resolution preprocessing reference (issue 30): transformers' LlavaNextImageProcessor
(the PIL backend, which 5.23 picks without torchvision) on landscape, portrait and square images
with two `image_grid_pinpoints` sets, at a tiny tile size (30; LLaVA-NeXT's is 336, the same code
at 11x the pixels).

Writes anyres_ref.safetensors (`{case}/pixel_values` [tiles, 3, crop, crop] f32) and
anyres_ref.json (cases: image file, processor settings, best resolution, image size; and
`token_counts`: the prompt's image-token count and the unpadded feature grid over 20 image sizes
at LLaVA-NeXT-7B's geometry; `pack_sizes`: the image sizes of the `pack/{i}/*` tensors,
`LlavaNextModel.pack_image_features` on random tile features). Images come
from images/ (gen_images.py); deterministic.

  /tmp/venv-ref/bin/python tests/reference/gen_anyres.py
"""
import json
import os

import numpy as np
import transformers
from PIL import Image
from safetensors.numpy import save_file
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

HERE = os.path.dirname(os.path.abspath(__file__))
assert transformers.__version__ == "5.23.0", transformers.__version__

SMALL = [[30, 60], [60, 30], [60, 60], [30, 90], [90, 30]]
WIDE = [[60, 60], [60, 120], [120, 60], [90, 90]]
CASES = [
    # (name, image, tile, pinpoints)
    ("photo_small", "photo.png", 30, SMALL),
    ("photo_wide", "photo.png", 30, WIDE),
    ("tall_small", "tall.png", 30, SMALL),
    ("tall_wide", "tall.png", 30, WIDE),
    ("tiny_small", "tiny.png", 30, SMALL),
    ("tiny_wide", "tiny.png", 30, WIDE),
]


def token_counts():
    """Image-token counts and unpadded feature grids for LLaVA-NeXT-7B's geometry (tile 336,
    patch 14, its pinpoints) over image sizes from tiny to extreme aspect ratios: the processor's
    count (`LlavaNextProcessor._get_number_of_features`, `default` strategy) and the model's
    unpadded grid (`unpad_image` on a [1, rows, cols] tensor of the selected grid)."""
    import types
    from functools import partial

    import torch
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    ns = types.SimpleNamespace(image_processor=types.SimpleNamespace(image_grid_pinpoints=pins),
                               patch_size=14, num_additional_image_tokens=1)
    ns._get_unpadded_features = partial(LlavaNextProcessor._get_unpadded_features, ns)
    rows = []
    for h, w in [(1, 1), (10, 10), (336, 336), (480, 640), (640, 480), (600, 800), (300, 1000),
                 (1000, 300), (17, 23), (301, 120), (397, 291), (1080, 1920), (1920, 1080),
                 (333, 1001), (999, 337), (2000, 10), (10, 2000), (672, 673), (559, 1117), (768, 1024)]:
        count = LlavaNextProcessor._get_number_of_features(ns, h, w, 336, 336) - 1  # `default`
        nh, nw = get_anyres_image_grid_shape((h, w), pins, 336)
        unpadded = unpad_image(torch.zeros(1, nh * 24, nw * 24), (h, w))
        rows.append({"image_size": [h, w], "grid": [nh, nw], "unpadded": list(unpadded.shape[1:]),
                     "image_tokens": count})
    return {"tile": 336, "patch": 14, "image_grid_pinpoints": pins, "strategy": "default", "sizes": rows}


def pack_cases(out):
    """`LlavaNextModel.pack_image_features` (default strategy, with image_newline) on random tile
    features [1 + grid tiles, 25, 3] (tile 30, patch 6, the SMALL pinpoints) for landscape,
    portrait, square and extreme images: `pack/{i}/{features,newline,packed}`."""
    import types

    import torch
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, get_anyres_image_grid_shape

    cfg = types.SimpleNamespace(vision_config=types.SimpleNamespace(image_size=30, patch_size=6),
                                image_grid_pinpoints=SMALL)
    ns = types.SimpleNamespace(config=cfg)
    g = torch.Generator().manual_seed(0)
    sizes = []
    for i, (h, w) in enumerate([(17, 23), (301, 120), (45, 45), (200, 1), (61, 59)]):
        nh, nw = get_anyres_image_grid_shape((h, w), SMALL, 30)
        feats = torch.randn(1 + nh * nw, 25, 3, generator=g)
        newline = torch.randn(3, generator=g)
        packed, lens = LlavaNextModel.pack_image_features(
            ns, [feats], torch.tensor([[h, w]]), "default", image_newline=newline)
        out[f"pack/{i}/features"] = feats.numpy()
        out[f"pack/{i}/newline"] = newline.numpy()
        out[f"pack/{i}/packed"] = packed[0].numpy()
        sizes.append([h, w])
    return sizes


def main():
    out, meta = {}, []
    for name, file, tile, pins in CASES:
        img = Image.open(os.path.join(HERE, "images", file)).convert("RGB")
        proc = LlavaNextImageProcessorPil(size={"shortest_edge": tile},
                                          crop_size={"height": tile, "width": tile},
                                          image_grid_pinpoints=pins)
        pv = proc(images=img, return_tensors="np")
        out[f"{name}/pixel_values"] = np.ascontiguousarray(pv["pixel_values"][0], np.float32)
        best = select_best_resolution((img.height, img.width), pins)
        meta.append({"name": name, "file": file, "tile": tile, "image_grid_pinpoints": pins,
                     "image_size": [img.height, img.width], "best_resolution": list(best),
                     "tiles": int(pv["pixel_values"].shape[1])})
        print(name, img.size, "->", best, pv["pixel_values"].shape)
    packs = pack_cases(out)
    save_file(out, os.path.join(HERE, "anyres_ref.safetensors"))
    with open(os.path.join(HERE, "anyres_ref.json"), "w") as f:
        json.dump({"transformers": transformers.__version__, "cases": meta,
                   "token_counts": token_counts(), "pack_sizes": packs}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
