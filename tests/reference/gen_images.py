"""Image preprocessing fixtures for tests/image_preprocess.rs.

Creates small deterministic test images in tests/reference/images/ and runs transformers'
CLIPImageProcessor on its PIL backend (`CLIPImageProcessorPil`, the one LLaVA always ran; with
torchvision installed transformers 5 would switch to a tensor-based resize) the way LLaVA calls it:
`Image.open(path).convert("RGB")`, optionally LLaVA's `expand2square`, then the processor.
Writes tests/reference/preprocess_ref.safetensors:
  case/<name>/pixel_values   f32 [3, H, W]   processor output
  resized/<name>             u8  [H, W, 3]   the PIL bicubic resize before the crop (a few cases)
  decode/<file>              u8  [H, W, 3]   PIL's Image.open(file).convert("RGB")
The case table (image file, shortest_edge, crop, flags) is stored as JSON in the metadata key
"cases" so the Rust test reads it instead of repeating it.

Pins (throw-away venv outside the repo, no torch, no torchvision):
  python3 -m venv /tmp/venv-img
  /tmp/venv-img/bin/pip install Pillow==13.0.0 numpy==2.4.6 transformers==5.23.0 safetensors==0.8.0
  /tmp/venv-img/bin/python tests/reference/gen_images.py
"""

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import PIL
import transformers
from PIL import Image, ImageDraw
from safetensors.numpy import save_file
from transformers import CLIPImageProcessorPil

assert PIL.__version__ == "13.0.0", PIL.__version__
assert transformers.__version__ == "5.23.0", transformers.__version__

HERE = Path(__file__).resolve().parent
IMAGES = HERE / "images"
IMAGES.mkdir(exist_ok=True)
rng = np.random.default_rng(20240611)


def photo_like(w, h, seed_shift=0.0):
    """Smooth gradients + Gaussian noise + solid shapes with sharp edges + a 1-px stripe patch."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 128 + 110 * np.sin(x / 37.0 + seed_shift) * np.cos(y / 53.0)
    g = 255 * x / (w - 1)
    b = 255 * (y / (h - 1)) ** 1.5
    a = np.stack([r, g, b], -1) + rng.normal(0, 9, (h, w, 3))
    im = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(im)
    d.rectangle([w // 10, h // 8, w // 3, h // 2], fill=(255, 255, 255))
    d.rectangle([w // 8, h // 6, w // 4, h // 3], fill=(0, 0, 0))
    d.ellipse([w // 2, h // 5, w // 2 + w // 4, h // 5 + h // 3], fill=(250, 20, 30))
    d.polygon([(w * 0.6, h * 0.7), (w * 0.95, h * 0.95), (w * 0.55, h * 0.98)], fill=(10, 200, 40))
    d.line([(0, h - 1), (w - 1, 0)], fill=(255, 255, 0), width=3)
    px = np.array(im)
    # a patch of 1-px black/white stripes: maximal overshoot, exercises the 0..255 clamp
    y0, x0 = (2 * h) // 3, w // 12
    px[y0 : y0 + h // 6, x0 : x0 + w // 6] = (np.arange(w // 6)[None, :, None] % 2) * 255
    return Image.fromarray(px, "RGB")


def png16(arr, color_type):
    """A 16-bit PNG written by hand (PIL cannot save 16-bit RGB)."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


# ---------------------------------------------------------------- images
photo = photo_like(397, 291)
photo.save(IMAGES / "photo.png")
photo_like(333, 250, 1.0).save(IMAGES / "photo.jpg", quality=90, subsampling="4:2:0")
photo_like(120, 301, 2.0).save(IMAGES / "tall.png")
photo_like(23, 17, 3.0).save(IMAGES / "tiny.png")

rgba = np.array(photo_like(45, 37, 4.0).convert("RGBA"))
rgba[..., 3] = np.linspace(0, 255, 45).astype(np.uint8)[None, :]  # alpha 0 (colour kept) .. 255
Image.fromarray(rgba, "RGBA").save(IMAGES / "rgba.png")

gray = np.array(photo_like(64, 48, 5.0).convert("L"))
Image.fromarray(gray, "L").save(IMAGES / "gray.png")

# decode-only oddities: 16-bit RGB / gray / gray+alpha, palette with tRNS, 1-bit, 8-bit LA
v16 = rng.integers(0, 65536, (6, 8, 4), dtype=np.uint16)
v16[0, :4, 0] = [0, 255, 256, 0x12FF]  # gray16 -> RGB clamps to 255, RGB16 takes the high byte
(IMAGES / "rgb16.png").write_bytes(png16(v16[..., :3], 2))
(IMAGES / "gray16.png").write_bytes(png16(v16[..., 0], 0))
(IMAGES / "la16.png").write_bytes(png16(v16[..., :2], 4))
pal = Image.fromarray(rng.integers(0, 6, (6, 8), dtype=np.uint8), "P")
pal.putpalette([int(c) for c in rng.integers(0, 256, 18)])
pal.save(IMAGES / "palette.png", transparency=2)
Image.fromarray(rng.integers(0, 2, (6, 8), dtype=np.uint8) * 255, "L").convert("1").save(IMAGES / "bw1.png")
Image.fromarray(rng.integers(0, 256, (6, 8, 2), dtype=np.uint8), "LA").save(IMAGES / "la.png")
photo_like(40, 30, 6.0).convert("L").save(IMAGES / "gray.jpg", quality=90)
Image.fromarray(rng.integers(0, 256, (16, 24, 4), dtype=np.uint8), "CMYK").save(IMAGES / "cmyk.jpg", quality=95)

# ---------------------------------------------------------------- processor runs
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]


def expand2square(pil_img, background_color):
    """LLaVA mm_utils.expand2square: paste centred on a square canvas."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    if width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


def processor(se, ch, cw, do_resize=True):
    p = CLIPImageProcessorPil(
        size={"shortest_edge": se},
        crop_size={"height": ch, "width": cw},
        do_resize=do_resize,
        image_mean=MEAN,
        image_std=STD,
    )
    assert type(p).__name__ == "CLIPImageProcessorPil" and p.backend == "pil", type(p)
    assert p.resample == Image.Resampling.BICUBIC and p.do_center_crop and p.do_rescale and p.do_normalize
    return p


# name, file, shortest_edge, crop_h, crop_w, pad_to_square, do_resize
CASES = [
    ("photo_png_224", "photo.png", 224, 224, 224, False, True),
    ("tall_224", "tall.png", 224, 224, 224, False, True),
    ("photo_jpg_96", "photo.jpg", 96, 96, 96, False, True),
    ("rgba_96", "rgba.png", 96, 96, 96, False, True),
    ("gray_96", "gray.png", 96, 96, 96, False, True),
    ("tiny_96", "tiny.png", 96, 96, 96, False, True),  # upscaling
    ("photo_png_30", "photo.png", 30, 30, 30, False, True),
    ("photo_png_61", "photo.png", 61, 61, 61, False, True),
    ("tall_61", "tall.png", 61, 61, 61, False, True),
    ("photo_jpg_61", "photo.jpg", 61, 61, 61, False, True),
    ("photo_png_se45_crop40x52", "photo.png", 45, 40, 52, False, True),
    ("photo_png_se24_crop30", "photo.png", 24, 30, 30, False, True),  # crop larger: zero pad
    ("tiny_noresize_crop30", "tiny.png", 30, 30, 30, False, False),  # smaller than the crop
    ("photo_png_pad_96", "photo.png", 96, 96, 96, True, True),
    ("tall_pad_61", "tall.png", 61, 61, 61, True, True),
    ("rgba_pad_30", "rgba.png", 30, 30, 30, True, True),
    ("photo_jpg_pad_61", "photo.jpg", 61, 61, 61, True, True),
]
RESIZED = {"photo_png_61", "tall_61", "photo_png_se45_crop40x52", "tiny_96"}

tensors = {}
meta = []
for name, file, se, ch, cw, pad, do_resize in CASES:
    p = processor(se, ch, cw, do_resize)
    img = Image.open(IMAGES / file).convert("RGB")  # what LLaVA does before the processor
    if pad:
        img = expand2square(img, tuple(int(x * 255) for x in p.image_mean))
    pv = p(images=img, return_tensors="np")["pixel_values"][0]
    assert pv.dtype == np.float32 and pv.shape == (3, ch, cw), (name, pv.dtype, pv.shape)
    tensors[f"case/{name}/pixel_values"] = np.ascontiguousarray(pv)
    if name in RESIZED:
        rs = p.resize(np.moveaxis(np.array(img), -1, 0), size=p.size, resample=p.resample)
        tensors[f"resized/{name}"] = np.ascontiguousarray(np.moveaxis(rs, 0, -1))
    meta.append(dict(name=name, file=file, shortest_edge=se, crop_height=ch, crop_width=cw,
                     pad_to_square=pad, do_resize=do_resize))

for file in ["photo.jpg", "gray.jpg", "cmyk.jpg", "rgba.png", "gray.png", "rgb16.png", "gray16.png", "la16.png", "palette.png", "bw1.png", "la.png"]:
    tensors[f"decode/{file}"] = np.ascontiguousarray(np.array(Image.open(IMAGES / file).convert("RGB")))

out = HERE / "preprocess_ref.safetensors"
save_file(tensors, str(out), metadata={
    "cases": json.dumps(meta),
    "pins": f"Pillow=={PIL.__version__} numpy=={np.__version__} transformers=={transformers.__version__}",
})
print(f"wrote {out} ({out.stat().st_size} bytes, {len(tensors)} tensors)")
