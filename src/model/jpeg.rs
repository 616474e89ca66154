//! JPEG decoder that reproduces Pillow 13.0.0's `Image.open(path).convert("RGB")` bit for bit.
//!
//! Pillow decodes JPEG with libjpeg-turbo 3.2.0 (the SIMD build in its wheels) at libjpeg's
//! defaults: the accurate integer IDCT (`JDCT_ISLOW`), "fancy" (triangle-filter) chroma
//! upsampling and libjpeg's YCbCr -> RGB tables. With fancy upsampling on, libjpeg never uses the
//! merged upsampler (`jdmerge.c`), so upsampling and colour conversion are separate steps here
//! too. The IDCT follows the integer arithmetic of the x86-64 AVX2 version exactly (it differs
//! from the C code only on overflow, i.e. corrupt data). Comments give the formulas.
//!
//! Supported: baseline and extended sequential Huffman (8-bit), progressive Huffman (spectral
//! selection and successive approximation), restart intervals (with libjpeg's resync rules),
//! any sampling factors libjpeg accepts (1..4, integral ratios), 1, 3 or 4 components, JFIF /
//! Adobe APP14 colour-space detection (YCbCr, RGB, CMYK, YCCK; CMYK is converted as Pillow
//! does), libjpeg's default Huffman tables when a sequential file has none. Not supported (an
//! error): arithmetic coding, lossless and hierarchical JPEG, 12-bit samples (Pillow refuses
//! anything but 8-bit too), 2 components (Pillow cannot open them).
//!
//! Corrupt data behaves as under Pillow: a marker in the middle of entropy-coded data pads the
//! segment with zero bits and leaves the rest of the segment grey (Pillow returns that image);
//! running out of file before EOI is an error ("image file is truncated" in Pillow), except
//! after the scan of a single-scan image. One divergence: when a progressive file never
//! delivers some of the first 9 AC coefficients in full (a damaged scan header or an early EOI),
//! libjpeg estimates them by inter-block smoothing (`decompress_smooth_data`); that is not
//! reproduced, so such files decode close to, but not exactly like, Pillow. Complete files
//! never trigger it. EXIF orientation is not applied (neither does `Image.open`).

use super::image::{STATE_BYTES, bytes, check_budget, total};

/// A decoded image: `width * height` interleaved RGB pixels.
pub(crate) struct Decoded {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

/// Decodes a JPEG file to RGB exactly as Pillow's `Image.open(..).convert("RGB")`.
///
/// `budget` bounds the decoder's whole working set against decompression bombs: `data` itself,
/// the sample planes, the coefficients of a multi-scan file, the RGB output and its row buffers
/// ([`Frame::working_set`]), checked before any of them is allocated. Errors are plain messages
/// for the caller to wrap.
pub(crate) fn decode(data: &[u8], budget: usize) -> Result<Decoded, String> {
    let mut d = Decoder {
        data,
        pos: 0,
        pending_marker: None,
        qt: [None; 4],
        dc_tables: [None, None, None, None],
        ac_tables: [None, None, None, None],
        restart_interval: 0,
        jfif: false,
        adobe_transform: None,
        frame: None,
        scans: 0,
        budget,
    };
    d.run()?;
    d.finish()
}

type R<T> = Result<T, String>;

const TRUNCATED: &str = "file is truncated (no end-of-image marker)";

/// Zigzag position -> natural (row-major) position in the 8x8 block, followed by 16 entries of
/// 63 (libjpeg's `jpeg_natural_order` padding) so that a corrupt run length that walks past the
/// end of the block (position up to 78) writes the last coefficient instead of out of bounds.
const NATURAL: [usize; 80] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20,
    13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59,
    52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63,
    63, 63, 63, 63, 63, 63,
];

// ------------------------------------------------------------------------------------------------
// Huffman tables

/// A DHT table as transmitted: code counts per length 1..=16 and the symbols.
#[derive(Clone)]
struct RawHuff {
    counts: [u8; 16],
    symbols: Vec<u8>,
}

/// The standard tables of JPEG Annex K.3, which libjpeg-turbo installs for sequential files
/// that define no table in slots 0 and 1 (Motion-JPEG frames omit them).
fn std_huff(ac: bool, slot: usize) -> RawHuff {
    const DC_LUMA: [u8; 16] = [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0];
    const DC_CHROMA: [u8; 16] = [0, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0];
    const AC_LUMA: [u8; 16] = [0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 0x7d];
    const AC_CHROMA: [u8; 16] = [0, 2, 1, 2, 4, 4, 3, 4, 7, 5, 4, 4, 0, 1, 2, 0x77];
    const AC_LUMA_SYMS: [u8; 162] = [
        0x01, 0x02, 0x03, 0x00, 0x04, 0x11, 0x05, 0x12, 0x21, 0x31, 0x41, 0x06, 0x13, 0x51, 0x61,
        0x07, 0x22, 0x71, 0x14, 0x32, 0x81, 0x91, 0xa1, 0x08, 0x23, 0x42, 0xb1, 0xc1, 0x15, 0x52,
        0xd1, 0xf0, 0x24, 0x33, 0x62, 0x72, 0x82, 0x09, 0x0a, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x25,
        0x26, 0x27, 0x28, 0x29, 0x2a, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3a, 0x43, 0x44, 0x45,
        0x46, 0x47, 0x48, 0x49, 0x4a, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5a, 0x63, 0x64,
        0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7a, 0x83,
        0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8a, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99,
        0x9a, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6,
        0xb7, 0xb8, 0xb9, 0xba, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xd2, 0xd3,
        0xd4, 0xd5, 0xd6, 0xd7, 0xd8, 0xd9, 0xda, 0xe1, 0xe2, 0xe3, 0xe4, 0xe5, 0xe6, 0xe7, 0xe8,
        0xe9, 0xea, 0xf1, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8, 0xf9, 0xfa,
    ];
    const AC_CHROMA_SYMS: [u8; 162] = [
        0x00, 0x01, 0x02, 0x03, 0x11, 0x04, 0x05, 0x21, 0x31, 0x06, 0x12, 0x41, 0x51, 0x07, 0x61,
        0x71, 0x13, 0x22, 0x32, 0x81, 0x08, 0x14, 0x42, 0x91, 0xa1, 0xb1, 0xc1, 0x09, 0x23, 0x33,
        0x52, 0xf0, 0x15, 0x62, 0x72, 0xd1, 0x0a, 0x16, 0x24, 0x34, 0xe1, 0x25, 0xf1, 0x17, 0x18,
        0x19, 0x1a, 0x26, 0x27, 0x28, 0x29, 0x2a, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3a, 0x43, 0x44,
        0x45, 0x46, 0x47, 0x48, 0x49, 0x4a, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5a, 0x63,
        0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7a,
        0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8a, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97,
        0x98, 0x99, 0x9a, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xb2, 0xb3, 0xb4,
        0xb5, 0xb6, 0xb7, 0xb8, 0xb9, 0xba, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca,
        0xd2, 0xd3, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8, 0xd9, 0xda, 0xe2, 0xe3, 0xe4, 0xe5, 0xe6, 0xe7,
        0xe8, 0xe9, 0xea, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8, 0xf9, 0xfa,
    ];
    let (counts, symbols): ([u8; 16], Vec<u8>) = match (ac, slot) {
        (false, 0) => (DC_LUMA, (0..12).collect()),
        (false, _) => (DC_CHROMA, (0..12).collect()),
        (true, 0) => (AC_LUMA, AC_LUMA_SYMS.to_vec()),
        (true, _) => (AC_CHROMA, AC_CHROMA_SYMS.to_vec()),
    };
    RawHuff { counts, symbols }
}

/// Bits looked up at once; longer codes take the bit-by-bit path (JPEG Figure F.16).
const LOOKAHEAD: u32 = 9;

/// A decoding table built like libjpeg's `jpeg_make_d_derived_tbl`.
struct Huff {
    /// Indexed by the next `LOOKAHEAD` bits: `(code length << 8) | symbol`, 0 if longer.
    lookup: Vec<u16>,
    /// Largest code of each length (-1 if none); `maxcode[17]` is a sentinel.
    maxcode: [i32; 18],
    /// Symbol index of a code of length l = code + valoffset[l].
    valoffset: [i32; 18],
    symbols: [u8; 256],
}

impl Huff {
    /// Builds and validates a table; the checks are libjpeg's (a table that is not a valid
    /// prefix code, more than 256 symbols, DC symbols above 15).
    fn new(raw: &RawHuff, dc: bool) -> R<Huff> {
        let bad = || Err("invalid Huffman table".to_string());
        let total: usize = raw.counts.iter().map(|&c| c as usize).sum();
        if total > 256 || total > raw.symbols.len() {
            return bad();
        }
        // canonical codes, in symbol order (JPEG Figure C.2)
        let mut codes = Vec::with_capacity(total);
        let mut code = 0u32;
        for (i, &n) in raw.counts.iter().enumerate() {
            let len = i as u32 + 1;
            for _ in 0..n {
                codes.push((code, len));
                code += 1;
            }
            // one more than the last code of this length must still fit in `len` bits (so, as
            // libjpeg checks it, the all-ones code of a length is never used)
            if n > 0 && code >= (1 << len) {
                return bad();
            }
            code <<= 1;
        }
        let mut maxcode = [-1i32; 18];
        let mut valoffset = [0i32; 18];
        let mut p = 0usize;
        for (i, &n) in raw.counts.iter().enumerate() {
            if n > 0 {
                valoffset[i + 1] = p as i32 - codes[p].0 as i32;
                p += n as usize;
                maxcode[i + 1] = codes[p - 1].0 as i32;
            }
        }
        maxcode[17] = 0xFFFFF;
        let mut lookup = vec![0u16; 1 << LOOKAHEAD];
        for (p, &(code, len)) in codes.iter().enumerate() {
            if len <= LOOKAHEAD {
                let shift = LOOKAHEAD - len;
                let first = (code << shift) as usize;
                for e in &mut lookup[first..first + (1 << shift)] {
                    *e = ((len as u16) << 8) | raw.symbols[p] as u16;
                }
            }
        }
        if dc && raw.symbols[..total].iter().any(|&s| s > 15) {
            return bad();
        }
        let mut symbols = [0u8; 256];
        symbols[..total].copy_from_slice(&raw.symbols[..total]);
        Ok(Huff {
            lookup,
            maxcode,
            valoffset,
            symbols,
        })
    }
}

// ------------------------------------------------------------------------------------------------
// Entropy-coded data: bits, with libjpeg's treatment of markers and missing data

/// Reads the entropy-coded segment of a scan. Like libjpeg's `jpeg_fill_bit_buffer`: `FF 00`
/// is a data byte `FF`, extra `FF`s before a marker are fill, and a marker ends the data: from
/// there on zero bits are supplied, and consuming any of them sets `insufficient` (libjpeg's
/// `insufficient_data`, after which MCUs are left zero until the next restart marker).
struct BitReader<'a> {
    data: &'a [u8],
    pos: usize,
    /// Bits, the next one in bit 63.
    buf: u64,
    /// Bits in `buf`, real data first, then zero padding.
    nbits: u32,
    /// How many of the leading `nbits` are real data.
    real: u32,
    /// The marker that ended the data (libjpeg's `unread_marker`), already consumed from `data`.
    marker: Option<u8>,
    insufficient: bool,
}

impl<'a> BitReader<'a> {
    fn new(data: &'a [u8], pos: usize) -> Self {
        BitReader {
            data,
            pos,
            buf: 0,
            nbits: 0,
            real: 0,
            marker: None,
            insufficient: false,
        }
    }

    fn byte(&mut self) -> R<u8> {
        let b = *self.data.get(self.pos).ok_or(TRUNCATED)?;
        self.pos += 1;
        Ok(b)
    }

    /// Tops the buffer up to more than 56 bits. Running out of file is an error (Pillow reports
    /// a truncated file; it never gets to an end-of-image marker).
    #[inline(never)]
    fn fill(&mut self) -> R<()> {
        while self.nbits <= 56 {
            if self.marker.is_none() {
                let mut c = self.byte()?;
                if c == 0xFF {
                    let mut next = self.byte()?;
                    while next == 0xFF {
                        next = self.byte()?;
                    }
                    if next != 0 {
                        self.marker = Some(next);
                        continue;
                    }
                    c = 0xFF;
                }
                self.buf |= (c as u64) << (56 - self.nbits);
                self.real += 8;
            }
            self.nbits += 8;
        }
        Ok(())
    }

    #[inline(always)]
    fn ensure(&mut self) -> R<()> {
        if self.nbits < 32 { self.fill() } else { Ok(()) }
    }

    #[inline(always)]
    fn consume(&mut self, n: u32) {
        self.buf <<= n;
        self.nbits -= n;
        if n > self.real {
            self.insufficient = true;
            self.real = 0;
        } else {
            self.real -= n;
        }
    }

    /// `n` (1..=16) bits as an unsigned number.
    #[inline(always)]
    fn bits(&mut self, n: u32) -> R<i32> {
        self.ensure()?;
        let v = (self.buf >> (64 - n)) as i32;
        self.consume(n);
        Ok(v)
    }

    #[inline(always)]
    fn bit(&mut self) -> R<bool> {
        Ok(self.bits(1)? != 0)
    }

    /// `n` bits, sign-extended as JPEG Figure F.12 (`HUFF_EXTEND`): values below 2^(n-1) are
    /// negative, `v - 2^n + 1`.
    #[inline(always)]
    fn extend(&mut self, n: u32) -> R<i32> {
        let v = self.bits(n)?;
        Ok(if v < 1 << (n - 1) {
            v - (1 << n) + 1
        } else {
            v
        })
    }

    /// One Huffman symbol. A bit pattern that is no code (possible only in corrupt data)
    /// consumes 17 bits and yields 0, as libjpeg's `jpeg_huff_decode`.
    #[inline(always)]
    fn huff(&mut self, t: &Huff) -> R<u8> {
        self.ensure()?;
        let e = t.lookup[(self.buf >> (64 - LOOKAHEAD)) as usize];
        if e != 0 {
            self.consume((e >> 8) as u32);
            return Ok(e as u8);
        }
        for len in LOOKAHEAD + 1..=16 {
            let code = (self.buf >> (64 - len)) as i32;
            if code <= t.maxcode[len as usize] {
                self.consume(len);
                return Ok(t.symbols[((code + t.valoffset[len as usize]) & 0xFF) as usize]);
            }
        }
        self.consume(17);
        Ok(0)
    }

    /// libjpeg's `next_marker`: skips to the next `FF xx` with `xx` not 0 or `FF`.
    fn next_marker(&mut self) -> R<u8> {
        loop {
            let mut c = self.byte()?;
            while c != 0xFF {
                c = self.byte()?;
            }
            while c == 0xFF {
                c = self.byte()?;
            }
            if c != 0 {
                return Ok(c);
            }
        }
    }

    /// Restart processing (`process_restart` + `read_restart_marker` + the default
    /// `jpeg_resync_to_restart`): drop buffered bits, find the marker, and swallow it if it is
    /// the expected RSTn. Otherwise resynchronise: skip markers that are invalid or earlier
    /// restarts, stop (leaving the marker unread, so the next segment decodes as empty) at a
    /// non-restart marker or one of the next two restarts, and treat any other RSTn as the
    /// expected one.
    fn restart(&mut self, expected: u8) -> R<()> {
        self.buf = 0;
        self.nbits = 0;
        self.real = 0;
        if self.marker.is_none() {
            self.marker = Some(self.next_marker()?);
        }
        while let Some(m) = self.marker {
            let n = m.wrapping_sub(0xD0);
            if n == expected {
                // the expected RSTn: swallow it
                self.marker = None;
            } else if m < 0xC0 || (n < 8 && (n == (expected + 7) & 7 || n == (expected + 6) & 7)) {
                // an invalid marker or one of the two previous restarts: look further
                self.marker = Some(self.next_marker()?);
                continue;
            } else if n < 8 && n != (expected + 1) & 7 && n != (expected + 2) & 7 {
                // a restart too far away to resync with: treat it as the expected one
                self.marker = None;
            }
            // otherwise (not a restart, or one of the next two): leave it unread
            break;
        }
        if self.marker.is_none() {
            self.insufficient = false;
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------------
// Frame and scan state

struct Component {
    id: u8,
    h: usize,
    v: usize,
    /// Quantization table slot named in the frame header.
    tq: usize,
    /// The table's contents (natural order), latched when the component's first scan starts,
    /// as libjpeg does (a DQT redefining the slot later does not affect this component).
    quant: Option<[u16; 64]>,
    /// Size in samples after subsampling: ceil(image size * factor / max factor).
    dw: usize,
    dh: usize,
    /// Blocks that cover `dw x dh` (the rest of an MCU is dummy blocks).
    bw: usize,
    bh: usize,
    /// Blocks per row of the padded MCU grid (coefficient storage stride).
    stride_blocks: usize,
    /// Coefficients (natural order, not dequantized) of every block of the padded MCU grid;
    /// only for files with several scans, decoded at the end.
    coefs: Vec<[i16; 64]>,
    /// Decoded samples, `bw * 8` wide and `bh * 8` high.
    plane: Vec<u8>,
}

struct Frame {
    progressive: bool,
    width: usize,
    height: usize,
    comps: Vec<Component>,
    max_h: usize,
    max_v: usize,
    /// MCU grid of interleaved scans.
    mcus_x: usize,
    mcus_y: usize,
    /// More than one scan (progressive, or components in separate scans): coefficients are kept
    /// and transformed after the last scan. Otherwise blocks are transformed as they arrive.
    multi_scan: bool,
}

impl Frame {
    /// Bytes the decoder holds at once for this frame, reading a file of `file_len` bytes: the
    /// file, the sample planes and then either the coefficients of a multi-scan file (freed
    /// before the output exists) or the RGB output and `to_rgb`'s row buffers, plus
    /// [`STATE_BYTES`].
    fn working_set(&self, file_len: usize) -> u128 {
        let planes = self.comps.iter().map(|c| bytes(&[c.bw, c.bh, 64]));
        let coefs = self.comps.iter().map(|c| {
            let blocks = [c.stride_blocks, self.mcus_y, c.v, size_of::<[i16; 64]>()];
            if self.multi_scan { bytes(&blocks) } else { 0 }
        });
        let rows = self.comps.iter().map(|c| {
            let upsampled = (c.dw * self.max_h / c.h).max(self.width);
            total([bytes(&[upsampled]), bytes(&[c.dw, size_of::<u16>()])])
        });
        let output = total([bytes(&[self.width, self.height, 3]), total(rows)]);
        total([
            bytes(&[file_len]),
            STATE_BYTES,
            total(planes),
            total(coefs).max(output),
        ])
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum ColorSpace {
    Gray,
    YCbCr,
    Rgb,
    Cmyk,
    Ycck,
}

struct ScanComp {
    /// Index into `Frame::comps`.
    ci: usize,
    dc: Option<Huff>,
    ac: Option<Huff>,
}

struct Scan {
    comps: Vec<ScanComp>,
    ss: usize,
    se: usize,
    ah: u32,
    al: u32,
}

struct Decoder<'a> {
    data: &'a [u8],
    pos: usize,
    /// A marker already read by the entropy decoder.
    pending_marker: Option<u8>,
    /// Quantization tables, natural order.
    qt: [Option<[u16; 64]>; 4],
    dc_tables: [Option<RawHuff>; 4],
    ac_tables: [Option<RawHuff>; 4],
    restart_interval: usize,
    jfif: bool,
    adobe_transform: Option<u8>,
    frame: Option<Frame>,
    scans: usize,
    /// Bytes the whole decode may hold at once (see [`decode`]).
    budget: usize,
}

/// A marker segment: `declared` payload bytes by its length field, of which the file may hold
/// fewer. Reading past the end of the file is `TRUNCATED`; the parsers check the declared
/// length in libjpeg's order, so a corrupt segment fails (or runs out of file) as in libjpeg.
struct Seg<'a> {
    data: &'a [u8],
    pos: usize,
    declared: isize,
}

impl<'a> Seg<'a> {
    fn bytes(&mut self, n: usize) -> R<&'a [u8]> {
        let b = self.data.get(self.pos..self.pos + n).ok_or(TRUNCATED)?;
        self.pos += n;
        Ok(b)
    }

    fn u8(&mut self) -> R<u8> {
        Ok(self.bytes(1)?[0])
    }

    fn u16(&mut self) -> R<usize> {
        let b = self.bytes(2)?;
        Ok(((b[0] as usize) << 8) | b[1] as usize)
    }

    /// Declared bytes not read yet (negative for a length field below 2).
    fn left(&self) -> isize {
        self.declared - self.pos as isize
    }
}

/// The marker segment whose length field is at `data[*pos]`; `pos` moves past it (or to the
/// end of the file if the segment runs past it).
fn read_segment<'a>(data: &'a [u8], pos: &mut usize) -> R<Seg<'a>> {
    if *pos + 2 > data.len() {
        return Err(TRUNCATED.into());
    }
    let declared = be16(data, *pos) as isize - 2;
    let start = *pos + 2;
    let end = (start + declared.max(0) as usize).min(data.len());
    *pos = end;
    Ok(Seg {
        data: &data[start..end],
        pos: 0,
        declared,
    })
}

fn be16(b: &[u8], i: usize) -> usize {
    ((b[i] as usize) << 8) | b[i + 1] as usize
}

impl<'a> Decoder<'a> {
    /// Reads markers and scans up to EOI. Running out of file is an error (Pillow: "image file
    /// is truncated") except after the scan of a single-scan image: all rows are decoded by
    /// then, and Pillow ignores libjpeg suspending in `jpeg_finish_decompress`.
    fn run(&mut self) -> R<()> {
        match self.read_markers() {
            Err(e)
                if e == TRUNCATED
                    && self.scans > 0
                    && self.frame.as_ref().is_some_and(|f| !f.multi_scan) =>
            {
                Ok(())
            }
            r => r,
        }
    }

    /// libjpeg's `read_markers` loop, up to EOI.
    fn read_markers(&mut self) -> R<()> {
        if self.data.len() < 2 || self.data[0] != 0xFF || self.data[1] != 0xD8 {
            return Err("not a JPEG file (no start-of-image marker)".into());
        }
        self.pos = 2;
        loop {
            let m = match self.pending_marker.take() {
                Some(m) => m,
                None => {
                    let mut r = BitReader::new(self.data, self.pos);
                    let m = r.next_marker()?;
                    self.pos = r.pos;
                    m
                }
            };
            match m {
                0xD8 => return Err("duplicate start-of-image marker".into()),
                0xC0 | 0xC1 => self.sof(false)?,
                0xC2 => self.sof(true)?,
                0xC3 | 0xC7 | 0xCB | 0xCF => {
                    return Err("lossless JPEG is not supported".into());
                }
                0xC9..=0xCA | 0xCD..=0xCE => {
                    return Err("arithmetic-coded JPEG is not supported".into());
                }
                0xC5 | 0xC6 | 0xC8 => {
                    return Err(format!("unsupported JPEG process (SOF marker 0x{m:02X})"));
                }
                0xC4 => self.dht()?,
                0xDB => self.dqt()?,
                0xDD => self.dri()?,
                0xDA => self.sos()?,
                0xD9 => {
                    if self.scans == 0 {
                        return Err("no image data before the end-of-image marker".into());
                    }
                    return Ok(());
                }
                // RSTn outside a scan and TEM carry no data; libjpeg ignores them
                0xD0..=0xD7 | 0x01 => {}
                0xE0 | 0xEE => self.appn(m)?,
                // other APPn, COM, DAC (arithmetic conditioning), DNL: skipped
                0xE1..=0xEF | 0xFE | 0xCC | 0xDC => {
                    self.segment()?;
                }
                _ => return Err(format!("unknown JPEG marker 0x{m:02X}")),
            }
        }
    }

    fn segment(&mut self) -> R<Seg<'a>> {
        read_segment(self.data, &mut self.pos)
    }

    /// APP0 (JFIF) and APP14 (Adobe) decide the colour space of 3- and 4-component files;
    /// libjpeg looks at their first 14 bytes.
    fn appn(&mut self, m: u8) -> R<()> {
        let mut s = self.segment()?;
        let n = s.declared.clamp(0, 14) as usize;
        let head = s.bytes(n)?;
        if m == 0xE0 && n >= 14 && head.starts_with(b"JFIF\0") {
            self.jfif = true;
        }
        if m == 0xEE && n >= 12 && head.starts_with(b"Adobe") {
            self.adobe_transform = Some(head[11]);
        }
        Ok(())
    }

    /// DQT: tables of 64 8- or 16-bit values in zigzag order. (libjpeg also takes shorter
    /// tables, meant for scaled DCTs; Pillow's own header parser rejects them.)
    fn dqt(&mut self) -> R<()> {
        let mut s = self.segment()?;
        while s.left() > 0 {
            let b = s.u8()?;
            let (wide, slot) = (b >> 4 != 0, (b & 15) as usize);
            if slot >= 4 {
                return Err(format!("quantization table number {slot} out of range"));
            }
            if s.left() < if wide { 128 } else { 64 } {
                return Err("bad quantization table length".into());
            }
            let mut t = [0u16; 64];
            for &n in &NATURAL[..64] {
                t[n] = if wide {
                    s.u16()? as u16
                } else {
                    s.u8()? as u16
                };
            }
            self.qt[slot] = Some(t);
        }
        if s.left() != 0 {
            return Err("bad quantization table length".into());
        }
        Ok(())
    }

    /// DHT, checked in libjpeg's order (`get_dht`).
    fn dht(&mut self) -> R<()> {
        let mut s = self.segment()?;
        while s.left() > 16 {
            let class = s.u8()?;
            let mut counts = [0u8; 16];
            for c in &mut counts {
                *c = s.u8()?;
            }
            let n: usize = counts.iter().map(|&c| c as usize).sum();
            if n > 256 || n as isize > s.left() {
                return Err("invalid Huffman table".into());
            }
            let symbols = s.bytes(n)?.to_vec();
            let (ac, slot) = ((class & 0x10) != 0, (class & !0x10) as usize);
            if slot >= 4 {
                return Err(format!("Huffman table number {class:#x} out of range"));
            }
            let raw = Some(RawHuff { counts, symbols });
            if ac {
                self.ac_tables[slot] = raw;
            } else {
                self.dc_tables[slot] = raw;
            }
        }
        if s.left() != 0 {
            return Err("bad Huffman table length".into());
        }
        Ok(())
    }

    fn dri(&mut self) -> R<()> {
        let mut s = self.segment()?;
        if s.declared != 2 {
            return Err("bad restart interval (DRI) length".into());
        }
        self.restart_interval = s.u16()?;
        Ok(())
    }

    fn sof(&mut self, progressive: bool) -> R<()> {
        if self.frame.is_some() {
            return Err("more than one frame (SOF marker)".into());
        }
        let mut s = self.segment()?;
        let (precision, height, width, n) = (s.u8()?, s.u16()?, s.u16()?, s.u8()? as usize);
        if width == 0 || height == 0 || n == 0 {
            return Err(format!("empty image ({width}x{height}, {n} components)"));
        }
        if s.left() != 3 * n as isize {
            return Err("bad frame header (SOF) length".into());
        }
        if precision != 8 {
            return Err(format!(
                "{precision}-bit JPEG is not supported (only 8-bit)"
            ));
        }
        if ![1, 3, 4].contains(&n) {
            return Err(format!("{n}-component JPEG is not supported (1, 3 or 4)"));
        }
        if width > 65500 || height > 65500 {
            return Err(format!("image too large ({width}x{height})"));
        }
        let mut comps = Vec::with_capacity(n);
        for c in s.bytes(3 * n)?.chunks_exact(3) {
            let (h, v) = ((c[1] >> 4) as usize, (c[1] & 15) as usize);
            if !(1..=4).contains(&h) || !(1..=4).contains(&v) {
                return Err(format!("bad sampling factors {h}x{v}"));
            }
            if c[2] >= 4 {
                return Err(format!("quantization table number {} out of range", c[2]));
            }
            comps.push(Component {
                id: c[0],
                h,
                v,
                tq: c[2] as usize,
                quant: None,
                dw: 0,
                dh: 0,
                bw: 0,
                bh: 0,
                stride_blocks: 0,
                coefs: Vec::new(),
                plane: Vec::new(),
            });
        }
        let max_h = comps.iter().map(|c| c.h).max().unwrap_or(1);
        let max_v = comps.iter().map(|c| c.v).max().unwrap_or(1);
        let mcus_x = width.div_ceil(8 * max_h);
        let mcus_y = height.div_ceil(8 * max_v);
        for c in &mut comps {
            if max_h % c.h != 0 || max_v % c.v != 0 {
                return Err(format!(
                    "unsupported sampling factors ({}x{} against {max_h}x{max_v})",
                    c.h, c.v
                ));
            }
            c.dw = (width * c.h).div_ceil(max_h);
            c.dh = (height * c.v).div_ceil(max_v);
            c.bw = c.dw.div_ceil(8);
            c.bh = c.dh.div_ceil(8);
            c.stride_blocks = mcus_x * c.h;
        }
        self.frame = Some(Frame {
            progressive,
            width,
            height,
            comps,
            max_h,
            max_v,
            mcus_x,
            mcus_y,
            multi_scan: false,
        });
        Ok(())
    }

    fn sos(&mut self) -> R<()> {
        let first = self.scans == 0;
        let Some(frame) = self.frame.as_mut() else {
            return Err("scan (SOS) before frame header (SOF)".into());
        };
        let mut seg = read_segment(self.data, &mut self.pos)?;
        let n = seg.u8()? as usize;
        if !(1..=4).contains(&n) || seg.declared != 4 + 2 * n as isize {
            return Err("bad scan header (SOS) length".into());
        }
        let selectors = seg.bytes(2 * n)?;
        let (ss, se, a) = (seg.u8()? as usize, seg.u8()? as usize, seg.u8()?);
        let (ah, al) = ((a >> 4) as u32, (a & 15) as u32);
        let mut picks: Vec<(usize, usize, usize)> = Vec::with_capacity(n);
        for s in selectors.chunks_exact(2) {
            let ci = frame
                .comps
                .iter()
                .position(|c| c.id == s[0])
                .ok_or_else(|| format!("scan names unknown component {}", s[0]))?;
            if picks.iter().any(|p| p.0 == ci) {
                return Err(format!("scan names component {} twice", s[0]));
            }
            picks.push((ci, (s[1] >> 4) as usize, (s[1] & 15) as usize));
        }

        if first {
            // the colour space and the decoding mode are fixed by the first scan
            // (libjpeg's jpeg_read_header / jpeg_start_decompress)
            frame.multi_scan = frame.progressive || n < frame.comps.len();
            let need = frame.working_set(self.data.len());
            check_budget(
                || {
                    format!(
                        "{}x{} frame ({} components{})",
                        frame.width,
                        frame.height,
                        frame.comps.len(),
                        if frame.multi_scan { ", multi-scan" } else { "" }
                    )
                },
                need,
                self.budget,
            )?;
            for c in &mut frame.comps {
                c.plane = vec![0u8; c.bw * c.bh * 64];
                if frame.multi_scan {
                    c.coefs = vec![[0i16; 64]; c.stride_blocks * frame.mcus_y * c.v];
                }
            }
            if !frame.progressive {
                for slot in 0..2 {
                    if self.dc_tables[slot].is_none() {
                        self.dc_tables[slot] = Some(std_huff(false, slot));
                    }
                    if self.ac_tables[slot].is_none() {
                        self.ac_tables[slot] = Some(std_huff(true, slot));
                    }
                }
            }
        } else if !frame.multi_scan {
            return Err("unexpected second scan in a single-scan JPEG".into());
        }
        if n > 1 {
            let blocks: usize = picks
                .iter()
                .map(|p| frame.comps[p.0].h * frame.comps[p.0].v)
                .sum();
            if blocks > 10 {
                return Err(format!("MCU of {blocks} blocks is too large (at most 10)"));
            }
        }
        // latch quantization tables
        for p in &picks {
            let c = &mut frame.comps[p.0];
            if c.quant.is_none() {
                c.quant = Some(
                    self.qt[c.tq]
                        .ok_or_else(|| format!("quantization table {} is not defined", c.tq))?,
                );
            }
        }
        let dc_first = frame.progressive && ss == 0 && ah == 0;
        if frame.progressive {
            let dc = ss == 0;
            let bad = (dc && se != 0)
                || (!dc && (ss > se || se > 63 || n != 1))
                || (ah != 0 && al + 1 != ah)
                || al > 13;
            if bad {
                return Err(format!(
                    "bad progressive scan parameters (Ss={ss} Se={se} Ah={ah} Al={al})"
                ));
            }
        }
        let table = |tables: &[Option<RawHuff>; 4], slot: usize, dc: bool| -> R<Huff> {
            let raw = tables
                .get(slot)
                .and_then(|t| t.as_ref())
                .ok_or_else(|| format!("Huffman table {slot} is not defined"))?;
            Huff::new(raw, dc)
        };
        let mut comps = Vec::with_capacity(n);
        for &(ci, td, ta) in &picks {
            let (need_dc, need_ac) = if !frame.progressive {
                (true, true)
            } else if ss == 0 {
                (dc_first, false)
            } else {
                (false, true)
            };
            let dc = if need_dc {
                Some(table(&self.dc_tables, td, true)?)
            } else {
                None
            };
            let ac = if need_ac {
                Some(table(&self.ac_tables, ta, false)?)
            } else {
                None
            };
            comps.push(ScanComp { ci, dc, ac });
        }
        let scan = Scan {
            comps,
            ss,
            se,
            ah,
            al,
        };
        let mut r = BitReader::new(self.data, self.pos);
        decode_scan(frame, &scan, self.restart_interval, &mut r)?;
        self.pos = r.pos;
        self.pending_marker = r.marker;
        self.scans += 1;
        Ok(())
    }

    /// After EOI: inverse DCT of stored coefficients, upsampling, colour conversion.
    fn finish(self) -> R<Decoded> {
        let Some(mut frame) = self.frame else {
            return Err("no frame header".into());
        };
        if frame.multi_scan {
            for c in &mut frame.comps {
                // a component that never appeared in a scan has all-zero coefficients
                let q = c.quant.unwrap_or([0; 64]);
                let stride = c.bw * 8;
                for by in 0..c.bh {
                    for bx in 0..c.bw {
                        let block = &c.coefs[by * c.stride_blocks + bx];
                        idct_islow(block, &q, &mut c.plane[by * 8 * stride + bx * 8..], stride);
                    }
                }
                c.coefs = Vec::new();
            }
        }
        let space = match frame.comps.len() {
            1 => ColorSpace::Gray,
            3 if self.jfif => ColorSpace::YCbCr,
            3 => match self.adobe_transform {
                Some(0) => ColorSpace::Rgb,
                Some(_) => ColorSpace::YCbCr,
                None => {
                    let ids: Vec<u8> = frame.comps.iter().map(|c| c.id).collect();
                    if ids == b"RGB" {
                        ColorSpace::Rgb
                    } else {
                        ColorSpace::YCbCr
                    }
                }
            },
            _ => match self.adobe_transform {
                None | Some(0) => ColorSpace::Cmyk,
                Some(_) => ColorSpace::Ycck,
            },
        };
        let rgb = to_rgb(&frame, space);
        Ok(Decoded {
            width: frame.width as u32,
            height: frame.height as u32,
            rgb,
        })
    }
}

// ------------------------------------------------------------------------------------------------
// Scan decoding (jdhuff.c for sequential scans, jdphuff.c for progressive ones)

/// Decodes one scan's entropy-coded data into the frame: coefficients for multi-scan files,
/// samples (through the IDCT) otherwise.
fn decode_scan(
    frame: &mut Frame,
    scan: &Scan,
    restart_interval: usize,
    r: &mut BitReader,
) -> R<()> {
    let single = scan.comps.len() == 1;
    // a scan of one component is not interleaved: its MCU is one block, in raster order over
    // the component's own blocks (no dummy blocks)
    let (mcus_x, mcus_y) = if single {
        let c = &frame.comps[scan.comps[0].ci];
        (c.bw, c.bh)
    } else {
        (frame.mcus_x, frame.mcus_y)
    };
    let progressive = frame.progressive;
    let multi = frame.multi_scan;
    let mut dc_pred = [0i32; 4];
    let mut eobrun = 0u32;
    let mut restarts_to_go = restart_interval;
    let mut next_restart = 0u8;
    let mut tmp = [0i16; 64];
    for my in 0..mcus_y {
        for mx in 0..mcus_x {
            if restart_interval > 0 {
                if restarts_to_go == 0 {
                    r.restart(next_restart)?;
                    next_restart = (next_restart + 1) & 7;
                    dc_pred = [0; 4];
                    eobrun = 0;
                    restarts_to_go = restart_interval;
                }
                restarts_to_go -= 1;
            }
            // once data ran out (a marker in the middle of the segment), MCUs are left as they
            // are until the next restart: zero, i.e. flat grey, for single-scan files
            let skip = r.insufficient;
            for (si, sc) in scan.comps.iter().enumerate() {
                let comp = &mut frame.comps[sc.ci];
                let (blocks_x, blocks_y) = if single { (1, 1) } else { (comp.h, comp.v) };
                for by in 0..blocks_y {
                    for bx in 0..blocks_x {
                        let (x, y) = if single {
                            (mx, my)
                        } else {
                            (mx * comp.h + bx, my * comp.v + by)
                        };
                        let block = if multi {
                            &mut comp.coefs[y * comp.stride_blocks + x]
                        } else {
                            tmp = [0; 64];
                            &mut tmp
                        };
                        if !skip {
                            if !progressive {
                                decode_block(r, sc, block, &mut dc_pred[si])?;
                            } else if scan.ss == 0 && scan.ah == 0 {
                                dc_first(r, sc, block, &mut dc_pred[si], scan.al)?;
                            } else if scan.ss == 0 {
                                if r.bit()? {
                                    block[0] |= 1 << scan.al;
                                }
                            } else if scan.ah == 0 {
                                ac_first(r, sc, block, scan, &mut eobrun)?;
                            } else {
                                ac_refine(r, sc, block, scan, &mut eobrun)?;
                            }
                        }
                        if !multi && x < comp.bw && y < comp.bh {
                            let q = comp.quant.as_ref().ok_or("quantization table missing")?;
                            let stride = comp.bw * 8;
                            let out = &mut comp.plane[y * 8 * stride + x * 8..];
                            idct_islow(&tmp, q, out, stride);
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// A sequential block: DC difference (category symbol + bits, added to the prediction), then
/// AC run/size symbols until EOB (0x00) or position 63; 0xF0 skips 16 zeros.
fn decode_block(r: &mut BitReader, sc: &ScanComp, block: &mut [i16; 64], pred: &mut i32) -> R<()> {
    let (Some(dc), Some(ac)) = (&sc.dc, &sc.ac) else {
        return Err("Huffman table missing".into());
    };
    let s = r.huff(dc)? as u32;
    let diff = if s > 0 { r.extend(s)? } else { 0 };
    *pred = pred.wrapping_add(diff);
    block[0] = *pred as i16;
    let mut k = 1;
    while k < 64 {
        let rs = r.huff(ac)?;
        let (run, size) = ((rs >> 4) as usize, (rs & 15) as u32);
        if size > 0 {
            k += run;
            block[NATURAL[k]] = r.extend(size)? as i16;
        } else if run == 15 {
            k += 15;
        } else {
            break;
        }
        k += 1;
    }
    Ok(())
}

/// Progressive DC, first scan: the DC value (with prediction) shifted left by Al.
fn dc_first(
    r: &mut BitReader,
    sc: &ScanComp,
    block: &mut [i16; 64],
    pred: &mut i32,
    al: u32,
) -> R<()> {
    let dc = sc.dc.as_ref().ok_or("Huffman table missing")?;
    let s = r.huff(dc)? as u32;
    let diff = if s > 0 { r.extend(s)? } else { 0 };
    *pred = pred.wrapping_add(diff);
    block[0] = ((*pred as u32) << al) as i16;
    Ok(())
}

/// Progressive AC, first scan of band Ss..=Se: like a sequential block, but values are shifted
/// left by Al and EOBn symbols (r < 15, size 0) start a run of 2^r + (r bits) empty bands.
fn ac_first(
    r: &mut BitReader,
    sc: &ScanComp,
    block: &mut [i16; 64],
    scan: &Scan,
    eobrun: &mut u32,
) -> R<()> {
    if *eobrun > 0 {
        *eobrun -= 1;
        return Ok(());
    }
    let ac = sc.ac.as_ref().ok_or("Huffman table missing")?;
    let mut k = scan.ss;
    while k <= scan.se {
        let rs = r.huff(ac)?;
        let (run, size) = ((rs >> 4) as u32, (rs & 15) as u32);
        if size > 0 {
            k += run as usize;
            let v = r.extend(size)?;
            block[NATURAL[k]] = ((v as u32) << scan.al) as i16;
        } else if run == 15 {
            k += 15;
        } else {
            let mut run_len = 1u32 << run;
            if run > 0 {
                run_len += r.bits(run)? as u32;
            }
            *eobrun = run_len - 1;
            break;
        }
        k += 1;
    }
    Ok(())
}

/// Progressive AC refinement (successive approximation, G.1.2.3): newly nonzero coefficients
/// (size 1, sign bit) are placed after skipping `run` zero coefficients, and every already
/// nonzero coefficient passed gets a correction bit that adds 2^Al away from zero.
fn ac_refine(
    r: &mut BitReader,
    sc: &ScanComp,
    block: &mut [i16; 64],
    scan: &Scan,
    eobrun: &mut u32,
) -> R<()> {
    let ac = sc.ac.as_ref().ok_or("Huffman table missing")?;
    let p1 = 1i16 << scan.al;
    let m1 = -1i16 << scan.al;
    let mut k = scan.ss;
    // correction bit for an already nonzero coefficient
    let refine = |r: &mut BitReader, c: &mut i16| -> R<()> {
        if r.bit()? && (*c & p1) == 0 {
            *c = c.wrapping_add(if *c >= 0 { p1 } else { m1 });
        }
        Ok(())
    };
    if *eobrun == 0 {
        while k <= scan.se {
            let rs = r.huff(ac)?;
            let (mut run, size) = ((rs >> 4) as i32, rs & 15);
            let mut value = 0i16;
            if size != 0 {
                // the size should always be 1; libjpeg only warns otherwise
                value = if r.bit()? { p1 } else { m1 };
            } else if run != 15 {
                let mut run_len = 1u32 << run;
                if run > 0 {
                    run_len += r.bits(run as u32)? as u32;
                }
                *eobrun = run_len;
                break;
            }
            loop {
                let c = &mut block[NATURAL[k]];
                if *c != 0 {
                    refine(r, c)?;
                } else {
                    run -= 1;
                    if run < 0 {
                        break;
                    }
                }
                k += 1;
                if k > scan.se {
                    break;
                }
            }
            if value != 0 {
                block[NATURAL[k]] = value;
            }
            k += 1;
        }
    }
    if *eobrun > 0 {
        while k <= scan.se {
            let c = &mut block[NATURAL[k]];
            if *c != 0 {
                refine(r, c)?;
            }
            k += 1;
        }
        *eobrun -= 1;
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Inverse DCT: libjpeg's jpeg_idct_islow (jidctint.c: Loeffler-Ligtenberg-Moschytz, 12 multiplies,
// CONST_BITS = 13, PASS1_BITS = 2) in the exact integer form of libjpeg-turbo's AVX2 version
// (simd/x86_64/jidctint-avx2.asm), which is what Pillow's wheels run on x86-64. For valid data
// it equals the C code; corrupt data with huge coefficients overflows, and then only the SIMD
// arithmetic reproduces Pillow: 16-bit dequantization (the low 16 bits of coef * quant), 16-bit
// wrapping sums where the SIMD code adds 16-bit lanes, 32-bit wrapping elsewhere, pass-1 results
// saturated to 16 bits, and the output saturated to 0..255 (the C code wraps via RANGE_MASK).

const CONST_BITS: u32 = 13;
const PASS1_BITS: u32 = 2;
// FIX(x) = round(x * 2^13)
const F_0_298: i32 = 2446; // FIX(0.298631336)
const F_0_390: i32 = 3196; // FIX(0.390180644)
const F_0_541: i32 = 4433; // FIX(0.541196100)
const F_0_765: i32 = 6270; // FIX(0.765366865)
const F_0_899: i32 = 7373; // FIX(0.899976223)
const F_1_175: i32 = 9633; // FIX(1.175875602)
const F_1_501: i32 = 12299; // FIX(1.501321110)
const F_1_847: i32 = 15137; // FIX(1.847759065)
const F_1_961: i32 = 16069; // FIX(1.961570560)
const F_2_053: i32 = 16819; // FIX(2.053119869)
const F_2_562: i32 = 20995; // FIX(2.562915447)
const F_3_072: i32 = 25172; // FIX(3.072711026)

/// One 8-point IDCT pass (scaled by sqrt(8) as in libjpeg) on 16-bit inputs; returns the 8
/// outputs before descaling. jidctint.c computes
///   even: z1 = (in2 + in6) c0.541, tmp2 = z1 - in6 c1.847, tmp3 = z1 + in2 c0.765,
///         tmp0 = (in0 + in4) << 13, tmp1 = (in0 - in4) << 13,
///         tmp10/13 = tmp0 -/+ tmp3, tmp11/12 = tmp1 -/+ tmp2 (signs: 10,11 add; 12,13 subtract)
///   odd:  z3 = in7 + in3, z4 = in5 + in1, z5 = (z3 + z4) c1.175,
///         z3' = z5 - z3 c1.961, z4' = z5 - z4 c0.390, z1 = in7 + in1, z2 = in5 + in3,
///         tmp0 = in7 c0.298 - z1 c0.899 + z3', tmp1 = in5 c2.053 - z2 c2.562 + z4',
///         tmp2 = in3 c3.072 - z2 c2.562 + z3', tmp3 = in1 c1.501 - z1 c0.899 + z4'
///   out:  [tmp10 + tmp3, tmp11 + tmp2, tmp12 + tmp1, tmp13 + tmp0, tmp13 - tmp0, ...,
///          tmp10 - tmp3];
/// the AVX2 code folds the shared products into per-input constants (the same integers) and
/// adds in0 + in4, in0 - in4, in7 + in3, in5 + in1 as 16-bit lanes.
#[inline(always)]
fn idct_1d(v: [i16; 8]) -> [i32; 8] {
    let x = |i: usize| v[i] as i32;
    // even part (pmaddwd pairs: exact in 32 bits for 16-bit inputs)
    let tmp3 = x(2) * (F_0_541 + F_0_765) + x(6) * F_0_541;
    let tmp2 = x(2) * F_0_541 + x(6) * (F_0_541 - F_1_847);
    let tmp0 = (v[0].wrapping_add(v[4]) as i32) << CONST_BITS;
    let tmp1 = (v[0].wrapping_sub(v[4]) as i32) << CONST_BITS;
    let (tmp10, tmp13) = (tmp0.wrapping_add(tmp3), tmp0.wrapping_sub(tmp3));
    let (tmp11, tmp12) = (tmp1.wrapping_add(tmp2), tmp1.wrapping_sub(tmp2));
    // odd part
    let z3 = v[7].wrapping_add(v[3]) as i32;
    let z4 = v[5].wrapping_add(v[1]) as i32;
    let (z3, z4) = (
        z3 * (F_1_175 - F_1_961) + z4 * F_1_175,
        z3 * F_1_175 + z4 * (F_1_175 - F_0_390),
    );
    let t0 = (x(7) * (F_0_298 - F_0_899) + x(1) * -F_0_899).wrapping_add(z3);
    let t1 = (x(5) * (F_2_053 - F_2_562) + x(3) * -F_2_562).wrapping_add(z4);
    let t2 = (x(5) * -F_2_562 + x(3) * (F_3_072 - F_2_562)).wrapping_add(z3);
    let t3 = (x(7) * -F_0_899 + x(1) * (F_1_501 - F_0_899)).wrapping_add(z4);
    [
        tmp10.wrapping_add(t3),
        tmp11.wrapping_add(t2),
        tmp12.wrapping_add(t1),
        tmp13.wrapping_add(t0),
        tmp13.wrapping_sub(t0),
        tmp12.wrapping_sub(t1),
        tmp11.wrapping_sub(t2),
        tmp10.wrapping_sub(t3),
    ]
}

/// `DESCALE(x, n)` (x / 2^n rounded half up) in 32-bit SIMD arithmetic, saturated to 16 bits.
#[inline(always)]
fn descale16(x: i32, n: u32) -> i16 {
    (x.wrapping_add(1 << (n - 1)) >> n).clamp(i16::MIN as i32, i16::MAX as i32) as i16
}

/// Dequantizes and inverse-transforms one block into `out` (8 rows of 8, `stride` apart).
fn idct_islow(coef: &[i16; 64], q: &[u16; 64], out: &mut [u8], stride: usize) {
    // dequantize: the low 16 bits of coef * quant (vpmullw)
    let dq = |i: usize| (coef[i] as i32).wrapping_mul(q[i] as i32) as i16;
    let mut ws = [0i16; 64];
    if coef[8..].iter().all(|&c| c == 0) {
        // rows 1-7 all zero: every column is constant, dq << PASS1_BITS (a 16-bit shift)
        for c in 0..8 {
            let v = dq(c).wrapping_shl(PASS1_BITS);
            for r in 0..8 {
                ws[r * 8 + c] = v;
            }
        }
    } else {
        // pass 1: columns, outputs scaled by 2^PASS1_BITS
        for c in 0..8 {
            let o = idct_1d(std::array::from_fn(|r| dq(r * 8 + c)));
            for r in 0..8 {
                ws[r * 8 + c] = descale16(o[r], CONST_BITS - PASS1_BITS);
            }
        }
    }
    // pass 2: rows; remove PASS1_BITS and the factor 8, saturate around 128
    for r in 0..8 {
        let row: [i16; 8] = std::array::from_fn(|c| ws[r * 8 + c]);
        let dst = &mut out[r * stride..r * stride + 8];
        if row[1..].iter().all(|&x| x == 0) {
            // constant row: what the full pass computes, (w0 + 16) >> 5
            dst.fill(range_limit(descale16(
                (row[0] as i32) << CONST_BITS,
                CONST_BITS + PASS1_BITS + 3,
            )));
            continue;
        }
        let o = idct_1d(row);
        for (d, &x) in dst.iter_mut().zip(&o) {
            *d = range_limit(descale16(x, CONST_BITS + PASS1_BITS + 3));
        }
    }
}

/// A centred IDCT output to a sample: clamp(x, -128, 127) + 128 (vpacksswb, then + 128).
#[inline(always)]
fn range_limit(x: i16) -> u8 {
    (x.clamp(-128, 127) + 128) as u8
}

// ------------------------------------------------------------------------------------------------
// Upsampling (jdsample.c) and colour conversion (jdcolor.c, then Pillow's CMYK handling)

/// libjpeg's per-component upsampling method under default settings (`jinit_upsampler`).
#[derive(Clone, Copy)]
enum Upsample {
    /// Full-size component.
    Full,
    /// 2:1 horizontal, triangle filter: 3/4 nearer + 1/4 further sample.
    H2V1Fancy,
    /// 1:2 vertical, triangle filter.
    H1V2Fancy,
    /// 2:1 both ways, triangle filter in both directions (9/16, 3/16, 3/16, 1/16).
    H2V2Fancy,
    /// Replication by integral factors (`int_upsample`, and h2v1/h2v2 when the component is at
    /// most 2 samples wide, where libjpeg skips the fancy filter).
    Box(usize, usize),
}

fn upsample_method(c: &Component, max_h: usize, max_v: usize) -> Upsample {
    let (h, v) = (c.h, c.v);
    if h == max_h && v == max_v {
        Upsample::Full
    } else if h * 2 == max_h && v == max_v {
        if c.dw > 2 {
            Upsample::H2V1Fancy
        } else {
            Upsample::Box(2, 1)
        }
    } else if h == max_h && v * 2 == max_v {
        Upsample::H1V2Fancy
    } else if h * 2 == max_h && v * 2 == max_v {
        if c.dw > 2 {
            Upsample::H2V2Fancy
        } else {
            Upsample::Box(2, 2)
        }
    } else {
        Upsample::Box(max_h / h, max_v / v)
    }
}

/// Output row `y` of a component, upsampled to (at least) `width` samples. Neighbouring rows
/// and columns beyond the component's `dw x dh` samples are the edge ones repeated, which is
/// what libjpeg's context rows and edge special cases amount to.
fn component_row<'b>(
    c: &'b Component,
    method: Upsample,
    y: usize,
    width: usize,
    buf: &'b mut [u8],
    sums: &mut [u16],
) -> &'b [u8] {
    let stride = c.bw * 8;
    let row = |i: usize| &c.plane[i * stride..i * stride + c.dw];
    match method {
        Upsample::Full => &c.plane[y * stride..y * stride + width],
        Upsample::Box(fh, fv) => {
            let src = row(y / fv);
            for (x, o) in buf[..width].iter_mut().enumerate() {
                *o = src[x / fh];
            }
            &buf[..width]
        }
        Upsample::H2V1Fancy => {
            // out[2j] = (3 in[j] + in[j-1] + 1) >> 2, out[2j+1] = (3 in[j] + in[j+1] + 2) >> 2
            let s = row(y);
            let last = c.dw - 1;
            for j in 0..c.dw {
                let near = 3 * s[j] as u32;
                buf[2 * j] = ((near + s[j.saturating_sub(1)] as u32 + 1) >> 2) as u8;
                buf[2 * j + 1] = ((near + s[(j + 1).min(last)] as u32 + 2) >> 2) as u8;
            }
            &buf[..width]
        }
        Upsample::H1V2Fancy => {
            // out = (3 nearer row + further row + bias) >> 2, bias 1 above, 2 below
            let (near, far, bias) = vertical_pair(c, y);
            let (near, far) = (row(near), row(far));
            for x in 0..width {
                buf[x] = ((3 * near[x] as u32 + far[x] as u32 + bias) >> 2) as u8;
            }
            &buf[..width]
        }
        Upsample::H2V2Fancy => {
            // column sums cs = 3 nearer row + further row, then
            // out[2j] = (3 cs[j] + cs[j-1] + 8) >> 4, out[2j+1] = (3 cs[j] + cs[j+1] + 7) >> 4,
            // the missing neighbour at either end being the edge column itself
            let (near, far, _) = vertical_pair(c, y);
            let cs = &mut sums[..c.dw];
            for ((s, &n), &f) in cs.iter_mut().zip(row(near)).zip(row(far)) {
                *s = 3 * n as u16 + f as u16;
            }
            let out = &mut buf[..2 * c.dw];
            let (first, last) = (cs[0] as u32, cs[c.dw - 1] as u32);
            out[0] = ((4 * first + 8) >> 4) as u8;
            out[1] = ((3 * first + cs[1] as u32 + 7) >> 4) as u8;
            for (o, w) in out[2..].chunks_exact_mut(2).zip(cs.windows(3)) {
                let (prev, this, next) = (w[0] as u32, w[1] as u32, w[2] as u32);
                o[0] = ((3 * this + prev + 8) >> 4) as u8;
                o[1] = ((3 * this + next + 7) >> 4) as u8;
            }
            let n = 2 * c.dw;
            out[n - 2] = ((3 * last + cs[c.dw - 2] as u32 + 8) >> 4) as u8;
            out[n - 1] = ((4 * last + 7) >> 4) as u8;
            &buf[..width]
        }
    }
}

/// For vertical 1:2 upsampling of output row `y`: the nearer input row, the further one (above
/// for even rows, below for odd; clamped to the component) and the rounding bias of h1v2.
fn vertical_pair(c: &Component, y: usize) -> (usize, usize, u32) {
    let i = y / 2;
    if y.is_multiple_of(2) {
        (i, i.saturating_sub(1), 1)
    } else {
        (i, (i + 1).min(c.dh - 1), 2)
    }
}

/// libjpeg's YCbCr -> RGB tables (`build_ycc_rgb_table`), 16-bit fixed point:
/// R = Y + Cr_r[Cr], G = Y + ((Cb_g[Cb] + Cr_g[Cr]) >> 16), B = Y + Cb_b[Cb], each clamped.
struct YccTables {
    cr_r: [i32; 256],
    cb_b: [i32; 256],
    cr_g: [i32; 256],
    cb_g: [i32; 256],
}

impl YccTables {
    fn new() -> Self {
        // FIX(x) = (x * 2^16 + 0.5) as integer; ONE_HALF = 2^15
        const FIX_1_40200: i32 = 91881;
        const FIX_1_77200: i32 = 116130;
        const FIX_0_71414: i32 = 46802;
        const FIX_0_34414: i32 = 22554;
        const ONE_HALF: i32 = 1 << 15;
        let mut t = YccTables {
            cr_r: [0; 256],
            cb_b: [0; 256],
            cr_g: [0; 256],
            cb_g: [0; 256],
        };
        for i in 0..256 {
            let x = i as i32 - 128;
            t.cr_r[i] = (FIX_1_40200 * x + ONE_HALF) >> 16;
            t.cb_b[i] = (FIX_1_77200 * x + ONE_HALF) >> 16;
            t.cr_g[i] = -FIX_0_71414 * x;
            t.cb_g[i] = -FIX_0_34414 * x + ONE_HALF;
        }
        t
    }

    #[inline(always)]
    fn rgb(&self, y: u8, cb: u8, cr: u8) -> [u8; 3] {
        let y = y as i32;
        let (cb, cr) = (cb as usize, cr as usize);
        let clamp = |v: i32| v.clamp(0, 255) as u8;
        [
            clamp(y + self.cr_r[cr]),
            clamp(y + ((self.cb_g[cb] + self.cr_g[cr]) >> 16)),
            clamp(y + self.cb_b[cb]),
        ]
    }
}

/// Pillow's CMYK -> RGB (`cmyk2rgb` in Convert.c) on the CMYK that libjpeg returns: Pillow
/// reads JPEG CMYK as "CMYK;I" (Adobe's inverted convention), so with c' = 255 - c, k' = 255 - k:
/// channel = clip(255 - k' - c' * (255 - k') / 255), where a * b / 255 is Pillow's MULDIV255:
/// t = a * b + 128, ((t >> 8) + t) >> 8.
#[inline(always)]
fn cmyk_to_rgb(c: u8, m: u8, y: u8, k: u8) -> [u8; 3] {
    let nk = k as u32; // 255 - k'
    [c, m, y].map(|v| {
        let t = (255 - v as u32) * nk + 128;
        (nk - (((t >> 8) + t) >> 8)) as u8
    })
}

fn to_rgb(frame: &Frame, space: ColorSpace) -> Vec<u8> {
    let (w, h) = (frame.width, frame.height);
    let methods: Vec<Upsample> = frame
        .comps
        .iter()
        .map(|c| upsample_method(c, frame.max_h, frame.max_v))
        .collect();
    let mut bufs: Vec<Vec<u8>> = frame
        .comps
        .iter()
        .map(|c| vec![0u8; (c.dw * frame.max_h / c.h).max(w)])
        .collect();
    let mut sums: Vec<Vec<u16>> = frame.comps.iter().map(|c| vec![0u16; c.dw]).collect();
    let ycc = YccTables::new();
    let mut rgb = vec![0u8; w * h * 3];
    for (y, out) in rgb.chunks_exact_mut(w * 3).enumerate() {
        let mut rows: [&[u8]; 4] = [&[]; 4];
        for (i, (c, buf)) in frame.comps.iter().zip(bufs.iter_mut()).enumerate() {
            rows[i] = component_row(c, methods[i], y, w, buf, &mut sums[i]);
        }
        let px = out.chunks_exact_mut(3);
        match space {
            ColorSpace::Gray => {
                for (o, &g) in px.zip(rows[0]) {
                    o.fill(g);
                }
            }
            ColorSpace::Rgb => {
                for (((o, &r), &g), &b) in px.zip(rows[0]).zip(rows[1]).zip(rows[2]) {
                    o.copy_from_slice(&[r, g, b]);
                }
            }
            ColorSpace::YCbCr => {
                for (((o, &yy), &cb), &cr) in px.zip(rows[0]).zip(rows[1]).zip(rows[2]) {
                    o.copy_from_slice(&ycc.rgb(yy, cb, cr));
                }
            }
            ColorSpace::Cmyk => {
                let cmyk = rows[0].iter().zip(rows[1]).zip(rows[2]).zip(rows[3]);
                for (o, (((&c, &m), &yl), &k)) in px.zip(cmyk) {
                    o.copy_from_slice(&cmyk_to_rgb(c, m, yl, k));
                }
            }
            ColorSpace::Ycck => {
                // libjpeg's ycck_cmyk_convert: C, M, Y = 255 - (R, G, B of the YCbCr triple),
                // clamped (the same as 255 - the clamped RGB); K passes through
                let ycck = rows[0].iter().zip(rows[1]).zip(rows[2]).zip(rows[3]);
                for (o, (((&yy, &cb), &cr), &k)) in px.zip(ycck) {
                    let [c, m, yl] = ycc.rgb(yy, cb, cr).map(|v| 255 - v);
                    o.copy_from_slice(&cmyk_to_rgb(c, m, yl, k));
                }
            }
        }
    }
    rgb
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_point_constants_match_libjpeg_fix() {
        let fix16 = |x: f64| (x * 65536.0 + 0.5) as i32;
        let t = YccTables::new();
        assert_eq!(t.cr_r[255], (fix16(1.402) * 127 + 32768) >> 16);
        assert_eq!(t.cb_b[0], (fix16(1.772) * -128 + 32768) >> 16);
        assert_eq!(t.cr_g[129], -fix16(0.71414));
        assert_eq!(t.cb_g[129], -fix16(0.34414) + 32768);
        let fix13 = |x: f64| (x * 8192.0 + 0.5) as i32;
        let consts = [
            (F_0_298, 0.298631336),
            (F_0_390, 0.390180644),
            (F_0_541, 0.541196100),
            (F_0_765, 0.765366865),
            (F_0_899, 0.899976223),
            (F_1_175, 1.175875602),
            (F_1_501, 1.501321110),
            (F_1_847, 1.847759065),
            (F_1_961, 1.961570560),
            (F_2_053, 2.053119869),
            (F_2_562, 2.562915447),
            (F_3_072, 3.072711026),
        ];
        for (c, x) in consts {
            assert_eq!(c, fix13(x), "{x}");
        }
    }

    #[test]
    fn dc_only_block_is_flat() {
        // DC 80 with quant 2 -> 160 -> pass 1: 640 -> pass 2: (640 + 16) >> 5 = 20 -> 148
        let mut coef = [0i16; 64];
        coef[0] = 80;
        let q = [2u16; 64];
        let mut out = [0u8; 64];
        idct_islow(&coef, &q, &mut out, 8);
        assert!(out.iter().all(|&v| v == 148), "{out:?}");
    }

    #[test]
    fn idct_saturates_like_the_simd_build() {
        // Pillow 13.0.0 (libjpeg-turbo 3.2.0, AVX2) on a DC-only 8x8 grey JPEG with quant 1:
        // DC 4800 -> 255 (C would wrap to 0), -4800 -> 0, 16000 -> 80 (16-bit shift wraps)
        let q = [1u16; 64];
        for (dc, want) in [(4800, 255), (-4800, 0), (16000, 80), (2400, 255)] {
            let mut coef = [0i16; 64];
            coef[0] = dc;
            let mut out = [0u8; 64];
            idct_islow(&coef, &q, &mut out, 8);
            assert_eq!(out[0], want, "DC {dc}");
        }
    }

    #[test]
    fn std_tables_are_valid() {
        for ac in [false, true] {
            for slot in 0..2 {
                let raw = std_huff(ac, slot);
                let n: usize = raw.counts.iter().map(|&c| c as usize).sum();
                assert_eq!(n, raw.symbols.len());
                assert!(Huff::new(&raw, !ac).is_ok());
            }
        }
    }

    #[test]
    fn cmyk_conversion_matches_pillow_formula() {
        // Pillow: CMYK;I raw (c, m, y, k) = (0, 255, 128, 255) -> inverted (255, 0, 127, 0)
        // -> nk = 255: R = 255 - 255 = 0, G = 255 - 0 = 255, B = 255 - 127 = 128
        assert_eq!(cmyk_to_rgb(0, 255, 128, 255), [0, 255, 128]);
        // k raw 0 (full black after inversion) -> all zero
        assert_eq!(cmyk_to_rgb(10, 20, 30, 0), [0, 0, 0]);
    }
}
