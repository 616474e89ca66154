"""JPEG decoding fixtures for tests/jpeg_decode.rs.

Writes small JPEGs into tests/reference/images/jpeg/ and, for each, Pillow's
`Image.open(path).convert("RGB")` as uint8 [H, W, 3] into tests/reference/jpeg_ref.safetensors
(tensor name = file name). The Rust decoder must reproduce every one bit for bit.

Two sources of files:
- Pillow 13.0.0 itself (libjpeg-turbo 3.2.0) encoding photo-like synthetic images: qualities
  50..100, 4:4:4 / 4:2:2 / 4:2:0, baseline / progressive / optimized, restart intervals, grey,
  CMYK, odd and tiny sizes (partial MCUs, chroma planes 1-2 samples wide).
- A minimal baseline encoder below (numpy DCT + the standard Huffman tables) for what Pillow
  cannot write: other sampling factors (4:4:0, 4:1:1, 3:1, 4x2, mixed, chroma larger than luma),
  RGB / YCCK / marker-less colour spaces, files without DHT, separate scans per component, and
  deliberately corrupted entropy data (markers in the middle of a segment) that libjpeg decodes
  with zero padding and restart resynchronisation.

Deterministic (seeded). Pins: the /tmp/venv-img venv of gen_images.py (Pillow==13.0.0,
numpy==2.4.6, safetensors==0.8.0):
  /tmp/venv-img/bin/python tests/reference/gen_jpeg.py
"""

import io
import struct
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageDraw
from safetensors.numpy import save_file

assert PIL.__version__ == "13.0.0", PIL.__version__

HERE = Path(__file__).resolve().parent
OUT = HERE / "images" / "jpeg"
OUT.mkdir(parents=True, exist_ok=True)
for old in OUT.glob("*.jpg"):
    old.unlink()
rng = np.random.default_rng(20250301)


def photo_like(w, h, phase=0.0):
    """Gradients + noise + hard-edged shapes + a 1-px stripe patch (as gen_images.py)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 128 + 110 * np.sin(x / 7.0 + phase) * np.cos(y / 11.0)
    g = 255 * x / max(w - 1, 1)
    b = 255 * (y / max(h - 1, 1)) ** 1.5
    a = np.stack([r, g, b], -1) + rng.normal(0, 9, (h, w, 3))
    im = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(im)
    d.rectangle([w // 10, h // 8, w // 3, h // 2], fill=(255, 255, 255))
    d.rectangle([w // 8, h // 6, w // 4, h // 3], fill=(0, 0, 0))
    d.ellipse([w // 2, h // 5, w // 2 + w // 4, h // 5 + h // 3], fill=(250, 20, 30))
    d.line([(0, h - 1), (w - 1, 0)], fill=(255, 255, 0), width=2)
    px = np.array(im)
    y0, x0 = (2 * h) // 3, w // 12
    px[y0 : y0 + max(h // 6, 1), x0 : x0 + max(w // 6, 1)] = (np.arange(max(w // 6, 1))[None, :, None] % 2) * 255
    return Image.fromarray(px, "RGB")


files = {}  # name -> bytes


def pil(name, img, **kw):
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    files[name] = buf.getvalue()


# ---------------------------------------------------------------- Pillow-encoded
big = photo_like(101, 67, 0.3)
mid = photo_like(64, 48, 1.1)
small = photo_like(37, 29, 2.0)
for sub in ["4:2:0", "4:2:2", "4:4:4"]:
    tag = sub.replace(":", "")
    pil(f"pil_q75_{tag}_101x67.jpg", big, quality=75, subsampling=sub)
    pil(f"pil_q50_{tag}_37x29.jpg", small, quality=50, subsampling=sub)
    pil(f"pil_q95_{tag}_37x29.jpg", small, quality=95, subsampling=sub)
    pil(f"pil_q90_{tag}_prog_37x29.jpg", small, quality=90, subsampling=sub, progressive=True)
pil("pil_q100_420_37x29.jpg", small, quality=100, subsampling="4:2:0")
pil("pil_q100_444_prog_37x29.jpg", small, quality=100, subsampling="4:4:4", progressive=True)
pil("pil_q75_420_prog_101x67.jpg", big, quality=75, subsampling="4:2:0", progressive=True)
pil("pil_q60_422_prog_opt_64x48.jpg", mid, quality=60, subsampling="4:2:2", progressive=True, optimize=True)
pil("pil_q75_420_opt_64x48.jpg", mid, quality=75, subsampling="4:2:0", optimize=True)
pil("pil_q75_420_rst5_101x67.jpg", big, quality=75, subsampling="4:2:0", restart_marker_blocks=5)
pil("pil_q85_444_rstrow_37x29.jpg", small, quality=85, subsampling="4:4:4", restart_marker_rows=1)
pil("pil_q80_420_prog_rst3_64x48.jpg", mid, quality=80, subsampling="4:2:0", progressive=True, restart_marker_blocks=3)
pil("pil_gray_q85_37x29.jpg", small.convert("L"), quality=85)
pil("pil_gray_q70_prog_64x48.jpg", mid.convert("L"), quality=70, progressive=True)
pil("pil_cmyk_q90_37x29.jpg", small.convert("CMYK"), quality=90)
pil("pil_cmyk_q80_prog_37x29.jpg", small.convert("CMYK"), quality=80, progressive=True)
pil("pil_q75_420_250x7.jpg", photo_like(250, 7, 0.7), quality=75, subsampling="4:2:0")
pil("pil_q75_422_7x250.jpg", photo_like(7, 250, 0.9), quality=75, subsampling="4:2:2")
# tiny / odd edges: chroma planes of 1-3 samples (libjpeg skips the fancy filter below 3)
for w, h in [(1, 1), (2, 2), (3, 1), (1, 3), (4, 3), (5, 5), (17, 9), (16, 16), (33, 17)]:
    img = photo_like(max(w, 2), max(h, 2), w + h).resize((w, h))
    for sub in ["4:2:0", "4:2:2"]:
        pil(f"pil_tiny_{sub.replace(':', '')}_{w}x{h}.jpg", img, quality=80, subsampling=sub)
pil("pil_tiny_444_1x1.jpg", Image.new("RGB", (1, 1), (200, 30, 90)), quality=80, subsampling="4:4:4")

# ---------------------------------------------------------------- minimal encoder
std = Image.new("RGB", (8, 8))
buf = io.BytesIO()
std.save(buf, "JPEG", quality=75)  # non-optimized: libjpeg's standard (Annex K) tables
STD_DHT = {}  # (class, slot) -> (counts, symbols)
data = buf.getvalue()
i = 2
while i < len(data):
    marker, length = data[i + 1], struct.unpack(">H", data[i + 2 : i + 4])[0]
    if marker == 0xC4:
        seg = data[i + 4 : i + 2 + length]
        while seg:
            counts = list(seg[1:17])
            n = sum(counts)
            STD_DHT[(seg[0] >> 4, seg[0] & 15)] = (counts, list(seg[17 : 17 + n]))
            seg = seg[17 + n :]
    if marker == 0xDA:
        break
    i += 2 + length
assert len(STD_DHT) == 4, STD_DHT.keys()


def huff_codes(counts, symbols):
    codes, code, k = {}, 0, 0
    for length, n in enumerate(counts, 1):
        for _ in range(n):
            codes[symbols[k]] = (code, length)
            code += 1
            k += 1
        code <<= 1
    return codes


CODES = {key: huff_codes(*v) for key, v in STD_DHT.items()}
ZIGZAG = [0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34,
          27, 20, 13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37,
          44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63]
u = np.arange(8)
DCT = np.sqrt(2 / 8) * np.cos((2 * u[None, :] + 1) * u[:, None] * np.pi / 16)
DCT[0] /= np.sqrt(2)
QLUMA = np.array([16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24,
                  40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77,
                  24, 35, 55, 64, 81, 104, 113, 92, 49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95,
                  98, 112, 100, 103, 99]).reshape(8, 8)


class Bits:
    def __init__(self):
        self.out, self.acc, self.n = bytearray(), 0, 0

    def put(self, value, length):
        for k in range(length - 1, -1, -1):
            self.acc = (self.acc << 1) | ((value >> k) & 1)
            self.n += 1
            if self.n == 8:
                self.out.append(self.acc)
                if self.acc == 0xFF:
                    self.out.append(0)
                self.acc, self.n = 0, 0

    def flush(self):
        while self.n:
            self.put(1, 1)


def category(v):
    return 0 if v == 0 else int(abs(v)).bit_length()


def put_value(bits, v, s):
    if s:
        bits.put(v if v > 0 else v + (1 << s) - 1, s)


def segment(marker, payload):
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + bytes(payload)


def encode(planes, factors, ids=None, app="jfif", restart=0, dht=True, separate_scans=False,
           qscale=1.0):
    """Baseline JPEG of full-resolution uint8 planes with the given (h, v) sampling factors.
    Chroma (components other than the first) is box-averaged down. `app`: "jfif", "adobe0",
    "adobe1", "adobe2" or None. One interleaved scan, or one scan per component."""
    H, W = planes[0].shape
    nc = len(planes)
    ids = ids or list(range(1, nc + 1))
    mh, mv = max(f[0] for f in factors), max(f[1] for f in factors)
    ph, pw = -(-H // (8 * mv)) * 8 * mv, -(-W // (8 * mh)) * 8 * mh
    qts = [np.clip(np.round(QLUMA * qscale * (1 if c == 0 else 1.3)), 1, 255).astype(int) for c in range(2)]
    comps = []
    for c, (plane, (h, v)) in enumerate(zip(planes, factors)):
        p = np.pad(plane.astype(np.float64), ((0, ph - H), (0, pw - W)), mode="edge")
        fy, fx = mv // v, mh // h
        p = p.reshape(ph // fy, fy, pw // fx, fx).mean(axis=(1, 3))
        q = qts[min(c, 1)]
        blocks = p.reshape(p.shape[0] // 8, 8, p.shape[1] // 8, 8).transpose(0, 2, 1, 3) - 128
        coef = np.round(np.einsum("ux,abxy,vy->abuv", DCT, blocks, DCT) / q).astype(int)
        comps.append(dict(coef=coef, h=h, v=v, q=min(c, 1)))

    def code_block(bits, blk, pred, tslot):
        zz = blk.reshape(64)[ZIGZAG]
        d = int(zz[0]) - pred
        s = category(d)
        bits.put(*CODES[(0, tslot)][s])
        put_value(bits, d, s)
        run = 0
        for k in range(1, 64):
            a = int(zz[k])
            if a == 0:
                run += 1
                continue
            while run > 15:
                bits.put(*CODES[(1, tslot)][0xF0])
                run -= 16
            s = category(a)
            bits.put(*CODES[(1, tslot)][(run << 4) | s])
            put_value(bits, a, s)
            run = 0
        if run:
            bits.put(*CODES[(1, tslot)][0x00])
        return int(zz[0])

    def scan(cis):
        bits, rst = Bits(), 0
        preds = [0] * nc
        if len(cis) == 1:
            c = comps[cis[0]]
            bh = -(-(-(-H * c["v"] // mv)) // 8)
            bw = -(-(-(-W * c["h"] // mh)) // 8)
            mcus = [[(cis[0], y, x)] for y in range(bh) for x in range(bw)]
        else:
            mcus = [[(ci, my * comps[ci]["v"] + by, mx * comps[ci]["h"] + bx)
                     for ci in cis for by in range(comps[ci]["v"]) for bx in range(comps[ci]["h"])]
                    for my in range(ph // (8 * mv)) for mx in range(pw // (8 * mh))]
        out = bytearray()
        for n, mcu in enumerate(mcus):
            if restart and n and n % restart == 0:
                bits.flush()
                out += bits.out + bytes([0xFF, 0xD0 + rst])
                bits.out, rst, preds = bytearray(), (rst + 1) & 7, [0] * nc
            for ci, y, x in mcu:
                preds[ci] = code_block(bits, comps[ci]["coef"][y, x], preds[ci], min(ci, 1))
        bits.flush()
        hdr = bytes([len(cis)]) + b"".join(bytes([ids[ci], (min(ci, 1) << 4) | min(ci, 1)]) for ci in cis)
        return segment(0xDA, hdr + bytes([0, 63, 0])) + bytes(out + bits.out)

    out = bytearray(b"\xff\xd8")
    if app == "jfif":
        out += segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
    elif app and app.startswith("adobe"):
        out += segment(0xEE, b"Adobe" + struct.pack(">HHHB", 100, 0, 0, int(app[5:])))
    for t in range(2):
        out += segment(0xDB, bytes([t]) + bytes(int(v) for v in qts[t].reshape(64)[ZIGZAG]))
    sof = struct.pack(">BHHB", 8, H, W, nc)
    for ci, c in enumerate(comps):
        sof += bytes([ids[ci], (c["h"] << 4) | c["v"], c["q"]])
    out += segment(0xC0, sof)
    if dht:
        for (cls, slot), (counts, syms) in sorted(STD_DHT.items()):
            out += segment(0xC4, bytes([(cls << 4) | slot] + counts + syms))
    if restart:
        out += segment(0xDD, struct.pack(">H", restart))
    if separate_scans:
        for ci in range(nc):
            out += scan([ci])
    else:
        out += scan(list(range(nc)))
    return bytes(out + b"\xff\xd9")


def ycc(img):
    return [np.array(ch) for ch in img.convert("YCbCr").split()]


m = photo_like(37, 29, 3.3)
files["enc_h1v2_37x29.jpg"] = encode(ycc(m), [(1, 2), (1, 1), (1, 1)])
files["enc_411_45x21.jpg"] = encode(ycc(photo_like(45, 21, 0.2)), [(4, 1), (1, 1), (1, 1)])
files["enc_31_27x11.jpg"] = encode(ycc(photo_like(27, 11, 0.4)), [(3, 1), (1, 1), (1, 1)])
files["enc_42_35x19.jpg"] = encode(ycc(photo_like(35, 19, 0.5)), [(4, 2), (1, 1), (1, 1)])
files["enc_mixed_37x29.jpg"] = encode(ycc(m), [(2, 2), (2, 1), (1, 1)])
files["enc_chroma_big_21x13.jpg"] = encode(ycc(photo_like(21, 13, 0.6)), [(1, 1), (2, 2), (2, 2)])
files["enc_h2v1_narrow_3x4.jpg"] = encode(ycc(photo_like(3, 4, 0.1)), [(2, 1), (1, 1), (1, 1)])
rgbp = [np.array(ch) for ch in m.split()]
files["enc_rgb_adobe0_37x29.jpg"] = encode(rgbp, [(1, 1)] * 3, app="adobe0")
files["enc_rgb_ids_37x29.jpg"] = encode(rgbp, [(1, 1)] * 3, ids=list(b"RGB"), app=None)
files["enc_ycc_nomarker_37x29.jpg"] = encode(ycc(m), [(2, 2), (1, 1), (1, 1)], app=None)
files["enc_ycc_adobe1_37x29.jpg"] = encode(ycc(m), [(2, 1), (1, 1), (1, 1)], app="adobe1")
k = np.array(m.convert("L"))[::-1].copy()
files["enc_ycck_37x29.jpg"] = encode(ycc(m) + [k], [(2, 2), (1, 1), (1, 1), (2, 2)], app="adobe2")
cmyk = [np.array(ch) for ch in m.convert("CMYK").split()]
cmyk[3] = k
files["enc_cmyk_noadobe_37x29.jpg"] = encode(cmyk, [(1, 1)] * 4, app=None)
files["enc_nodht_37x29.jpg"] = encode(ycc(m), [(2, 2), (1, 1), (1, 1)], dht=False)
files["enc_rst2_37x29.jpg"] = encode(ycc(m), [(2, 2), (1, 1), (1, 1)], restart=2)
files["enc_separate_scans_37x29.jpg"] = encode(ycc(m), [(2, 2), (1, 1), (1, 1)], separate_scans=True)
files["enc_q1_37x29.jpg"] = encode(ycc(m), [(1, 1)] * 3, qscale=0.01)

# corrupt entropy data: libjpeg pads with zeros at the marker, leaves the rest of the segment
# grey, and resynchronises at the next restart marker
r = bytearray(encode(ycc(photo_like(64, 48, 1.7)), [(2, 2), (1, 1), (1, 1)], restart=1))
rst = [j for j in range(len(r) - 1) if r[j] == 0xFF and 0xD0 <= r[j + 1] <= 0xD7]
files["bad_cut_segment_64x48.jpg"] = bytes(r[: rst[1] - 25] + r[rst[1] :])  # segment 2 short
files["bad_missing_rst_64x48.jpg"] = bytes(r[: rst[2]] + r[rst[2] + 2 :])  # RST2 gone
files["bad_wrong_rst_64x48.jpg"] = bytes(r[: rst[3] + 1] + bytes([0xD7]) + r[rst[3] + 2 :])
seq = files["pil_q75_420_101x67.jpg"]
files["bad_half_then_eoi_101x67.jpg"] = seq[: len(seq) // 2] + b"\xff\xd9"
files["bad_fill_ff_37x29.jpg"] = files["pil_q50_420_37x29.jpg"][:-2] + b"\xff\xff\xff\xd9"

# ---------------------------------------------------------------- references
tensors = {}
for name, blob in sorted(files.items()):
    (OUT / name).write_bytes(blob)
    im = Image.open(OUT / name)
    tensors[name] = np.ascontiguousarray(np.array(im.convert("RGB")))
out = HERE / "jpeg_ref.safetensors"
save_file(tensors, str(out), metadata={"pins": f"Pillow=={PIL.__version__} numpy=={np.__version__}"})
jpeg_bytes = sum(len(b) for b in files.values())
print(f"wrote {len(files)} JPEGs ({jpeg_bytes} bytes) and {out.name} ({out.stat().st_size} bytes)")
