#!/usr/bin/env python3
"""LLaVA-NeXT any-resolution preprocessing reference (issue 30): transformers' LlavaNextImageProcessor
(the PIL backend, which 5.23 picks without torchvision) on landscape, portrait and square images
with two `image_grid_pinpoints` sets, at a tiny tile size (30; LLaVA-NeXT's is 336, the same code
at 11x the pixels).

Writes anyres_ref.safetensors (`{case}/pixel_values` [tiles, 3, crop, crop] f32) and
anyres_ref.json (cases: image file, processor settings, best resolution, image size). Images come
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
    save_file(out, os.path.join(HERE, "anyres_ref.safetensors"))
    with open(os.path.join(HERE, "anyres_ref.json"), "w") as f:
        json.dump({"transformers": transformers.__version__, "cases": meta}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
