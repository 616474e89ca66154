//! ShapesVQA: determinism, split disjointness, answers checked against the scene by an independent
//! reading of each question, relevance masks against renders of each object alone, the sign text
//! read back from pixels, LLaVA export/import round trips and errors on damaged exports.

use fineprune::Error;
use fineprune::bench::shapes::{
    Background, Color, DESCRIBE, Family, Object, ObjectKind, PopeKind, SHAPE_COLORS,
    SHAPE_POSITIONS, SHORT_ANSWER, SIGN_CHARSET, SIGN_INK, SIGN_PAD, Sample, Scene, Shape,
    ShapesConfig, Size, Split, Texture, TrainTurns, export_llava_eval, export_llava_train,
    generate, generate_one, glyph, read_llava_eval,
};
use std::collections::HashSet;
use std::path::Path;

fn cfg() -> ShapesConfig {
    ShapesConfig::default()
}

fn color_named(w: &str) -> Color {
    Color::ALL
        .into_iter()
        .find(|c| c.name() == w)
        .unwrap_or_else(|| panic!("not a colour: {w}"))
}

fn shape_named(w: &str) -> Shape {
    Shape::ALL
        .into_iter()
        .find(|s| s.name() == w)
        .unwrap_or_else(|| panic!("not a shape: {w}"))
}

fn size_named(w: &str) -> Option<Size> {
    Size::ALL.into_iter().find(|s| s.name() == w)
}

/// Shape objects as (index, shape, colour, size).
fn shapes(scene: &Scene) -> Vec<(usize, Shape, Color, Size)> {
    scene
        .objects
        .iter()
        .enumerate()
        .filter_map(|(i, o)| o.shape().map(|(s, c, z)| (i, s, c, z)))
        .collect()
}

/// Resolves "the [size] [color] shape" to the indices of the matching shape objects.
fn resolve(scene: &Scene, phrase: &str) -> Vec<usize> {
    let words: Vec<&str> = phrase.strip_prefix("the ").unwrap().split(' ').collect();
    let shape = shape_named(words[words.len() - 1]);
    let (mut size, mut color) = (None, None);
    for w in &words[..words.len() - 1] {
        match size_named(w) {
            Some(z) => size = Some(z),
            None => color = Some(color_named(w)),
        }
    }
    shapes(scene)
        .into_iter()
        .filter(|o| o.1 == shape && size.is_none_or(|z| o.3 == z) && color.is_none_or(|c| o.2 == c))
        .map(|o| o.0)
        .collect()
}

/// A sample's phrases occur in its question and name its referenced objects: all of them in one
/// phrase, except relative position's two phrases, one object each in question order, each
/// resolving to its object from the scene alone; none for an existence "no".
fn check_refs(s: &Sample) {
    for r in &s.refs {
        assert!(
            s.question.contains(&r.phrase),
            "{}: {:?}",
            s.question,
            r.phrase
        );
    }
    if s.referenced.is_empty() {
        assert!(s.refs.is_empty(), "{}", s.question);
        return;
    }
    if s.family == Family::RelativePosition {
        assert_eq!(s.refs.len(), 2, "{}", s.question);
        let (a, b) = (&s.refs[0], &s.refs[1]);
        assert!(s.question.find(&a.phrase) < s.question.find(&b.phrase));
        assert_eq!(a.objects, vec![s.referenced[0]]);
        assert_eq!(b.objects, vec![s.referenced[1]]);
        assert_eq!(resolve(&s.scene, &a.phrase), a.objects, "{}", s.question);
        assert_eq!(resolve(&s.scene, &b.phrase), b.objects, "{}", s.question);
    } else {
        assert_eq!(s.refs.len(), 1, "{}", s.question);
        assert_eq!(s.refs[0].objects, s.referenced, "{}", s.question);
    }
}

/// Checks a sample's answers and (unless `answer_only`) its referenced objects and POPE kind by
/// reading its question afresh.
fn check_answer(s: &Sample, answer_only: bool) {
    let sc = &s.scene;
    let objs = shapes(sc);
    let q = s.question.as_str();
    let a = s.answers[0].as_str();
    let ctx = format!("{}: {q} -> {:?}", s.id, s.answers);
    let mut referenced = s.referenced.clone();
    referenced.sort();
    let check_refs = |expect: &[usize]| {
        if !answer_only {
            assert_eq!(referenced, expect, "{ctx}");
        }
    };
    match s.family {
        Family::Color => {
            let phrase = q
                .strip_prefix("What color is ")
                .unwrap()
                .trim_end_matches('?');
            let m = resolve(sc, phrase);
            assert_eq!(m.len(), 1, "{ctx}: ambiguous");
            assert_eq!(a, sc.objects[m[0]].shape().unwrap().1.name(), "{ctx}");
            check_refs(&m);
        }
        Family::Shape => {
            let c = q.strip_prefix("What shape is the ").unwrap();
            let c = color_named(c.strip_suffix(" object?").unwrap());
            let m: Vec<_> = objs.iter().filter(|o| o.2 == c).collect();
            assert_eq!(m.len(), 1, "{ctx}: ambiguous");
            assert_eq!(a, m[0].1.name(), "{ctx}");
            check_refs(&[m[0].0]);
        }
        Family::Count => {
            let what = q.strip_prefix("How many ").unwrap();
            let what = what.strip_suffix(" are there?").unwrap();
            let m: Vec<usize> = match what.strip_suffix(" objects") {
                Some(c) => {
                    let c = color_named(c);
                    objs.iter().filter(|o| o.2 == c).map(|o| o.0).collect()
                }
                None => {
                    let sh = shape_named(what.strip_suffix('s').unwrap());
                    objs.iter().filter(|o| o.1 == sh).map(|o| o.0).collect()
                }
            };
            assert!(!m.is_empty(), "{ctx}");
            assert_eq!(a, m.len().to_string(), "{ctx}");
            if !answer_only {
                assert_eq!(s.answers.len(), 2, "{ctx}");
            }
            check_refs(&m);
        }
        Family::Existence => {
            let rest = q.strip_prefix("Is there ").unwrap();
            let rest = rest.strip_suffix(" in the image?").unwrap();
            let words: Vec<&str> = rest.split(' ').collect();
            assert_eq!(
                words[0],
                if words[1] == "orange" { "an" } else { "a" },
                "{ctx}"
            );
            let (c, sh) = (color_named(words[1]), shape_named(words[2]));
            let m: Vec<usize> = objs
                .iter()
                .filter(|o| o.1 == sh && o.2 == c)
                .map(|o| o.0)
                .collect();
            assert_eq!(a, if m.is_empty() { "no" } else { "yes" }, "{ctx}");
            check_refs(&m);
            if answer_only {
                return;
            }
            let colors: HashSet<Color> = objs.iter().map(|o| o.2).collect();
            let shapes_here: HashSet<Shape> = objs.iter().map(|o| o.1).collect();
            match s.pope_kind {
                None => assert_eq!(a, "yes", "{ctx}"),
                Some(PopeKind::Random) => assert_eq!(a, "no"),
                // default priors: circle and red are the most frequent
                Some(PopeKind::Popular) => assert!(
                    (sh == Shape::Circle && !colors.contains(&c))
                        || (c == Color::Red && !shapes_here.contains(&sh)),
                    "{ctx}"
                ),
                Some(PopeKind::Adversarial) => {
                    assert!(colors.contains(&c) && shapes_here.contains(&sh) && m.is_empty())
                }
            }
        }
        Family::RelativePosition => {
            let body = q.strip_prefix("Is ").unwrap().trim_end_matches('?');
            let (pa, pb, horizontal) =
                if let Some((x, y)) = body.split_once(" to the left or right of ") {
                    (x, y, true)
                } else {
                    let (x, y) = body.split_once(" above or below ").unwrap();
                    (x, y, false)
                };
            let (ma, mb) = (resolve(sc, pa), resolve(sc, pb));
            assert!(ma.len() == 1 && mb.len() == 1, "{ctx}: ambiguous");
            let (ba, bb) = (sc.objects[ma[0]].bbox(), sc.objects[mb[0]].bbox());
            let expect = if horizontal {
                if ba.2 < bb.0 {
                    "left"
                } else {
                    assert!(bb.2 < ba.0, "{ctx}: boxes overlap horizontally");
                    "right"
                }
            } else if ba.3 < bb.1 {
                "above"
            } else {
                assert!(bb.3 < ba.1, "{ctx}: boxes overlap vertically");
                "below"
            };
            assert_eq!(a, expect, "{ctx}");
            if !answer_only {
                assert_eq!(s.referenced, vec![ma[0], mb[0]], "{ctx}");
            }
        }
        Family::ReadText => {
            assert_eq!(q, "What does the sign say?");
            let signs: Vec<usize> = (0..sc.objects.len())
                .filter(|&i| sc.objects[i].sign_text().is_some())
                .collect();
            assert_eq!(signs.len(), 1, "{ctx}");
            assert_eq!(a, sc.objects[signs[0]].sign_text().unwrap(), "{ctx}");
            check_refs(&signs);
        }
    }
    if s.family != Family::Existence {
        assert_eq!(s.pope_kind, None);
    }
}

/// Structural invariants of a scene.
fn check_scene(s: &Sample) {
    let objs = shapes(&s.scene);
    assert!(
        (2..=8).contains(&objs.len()),
        "{}: {} shapes",
        s.id,
        objs.len()
    );
    let signs: Vec<&Object> = s
        .scene
        .objects
        .iter()
        .filter(|o| o.sign_text().is_some())
        .collect();
    assert!(signs.len() <= 1);
    if let Some(sign) = signs.first() {
        assert!(
            objs.iter().all(|o| o.1 != Shape::Rectangle),
            "{}: rectangle beside a sign",
            s.id
        );
        let t = sign.sign_text().unwrap();
        assert!((2..=5).contains(&t.len()) && t.chars().all(|c| SIGN_CHARSET.contains(c)));
    }
    for o in &s.scene.objects {
        let (x0, y0, x1, y1) = o.bbox();
        assert!(
            x0 >= 0.0 && y0 >= 0.0 && x1 <= 1.0 && y1 <= 1.0,
            "{}: outside",
            s.id
        );
    }
    for (i, a) in s.scene.objects.iter().enumerate() {
        for b in &s.scene.objects[i + 1..] {
            let (a0, b0) = (a.bbox(), b.bbox());
            let w = (a0.2.min(b0.2) - a0.0.max(b0.0)).max(0.0);
            let h = (a0.3.min(b0.3) - a0.1.max(b0.1)).max(0.0);
            let smaller = ((a0.2 - a0.0) * (a0.3 - a0.1)).min((b0.2 - b0.0) * (b0.3 - b0.1));
            if a.sign_text().is_some() || b.sign_text().is_some() {
                assert_eq!(w * h, 0.0, "{}: sign overlapped", s.id);
            } else {
                assert!(
                    w * h <= 0.1 * smaller + 1e-6,
                    "{}: overlap {}",
                    s.id,
                    w * h / smaller
                );
            }
        }
    }
}

#[test]
fn same_seed_same_samples_and_png_bytes_different_seed_different() {
    let c = cfg();
    let a = generate(Split::Test, 18, 7, &c).unwrap();
    let b = generate(Split::Test, 18, 7, &c).unwrap();
    assert_eq!(a, b);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(
            x.scene.png(64).unwrap(),
            y.scene.png(64).unwrap(),
            "{}",
            x.id
        );
    }
    let other = generate(Split::Test, 18, 8, &c).unwrap();
    for (x, y) in a.iter().zip(&other) {
        assert_ne!(x.scene, y.scene);
        assert_ne!(x.scene.png(64).unwrap(), y.scene.png(64).unwrap());
    }
    // a sample does not depend on how many are generated
    let short = generate(Split::Test, 7, 7, &c).unwrap();
    assert_eq!(short[..], a[..7]);
    assert_eq!(generate_one(Split::Test, 13, 7, &c).unwrap(), a[13]);
    assert_eq!(a[3].id, "test-7-000003");
}

#[test]
fn splits_never_share_a_scene() {
    let c = cfg();
    let mut seen: HashSet<String> = HashSet::new();
    let mut ids = HashSet::new();
    for split in [Split::Train, Split::Val, Split::Test] {
        for s in generate(split, 150, 3, &c).unwrap() {
            assert_eq!(s.split, split);
            assert!(ids.insert(s.id.clone()));
            let key = serde_json::to_string(&s.scene).unwrap();
            assert!(seen.insert(key), "{} repeats a scene", s.id);
        }
    }
}

#[test]
fn families_are_balanced_and_every_answer_matches_the_scene() {
    let samples = generate(Split::Val, 240, 11, &cfg()).unwrap();
    for f in Family::ALL {
        let n = samples.iter().filter(|s| s.family == f).count();
        assert_eq!(n, 40, "{f}");
    }
    let exist: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.family == Family::Existence)
        .collect();
    assert_eq!(exist.iter().filter(|s| s.answers[0] == "yes").count(), 20);
    for k in PopeKind::ALL {
        let n = exist.iter().filter(|s| s.pope_kind == Some(k)).count();
        assert!((6..=7).contains(&n), "{k:?}: {n}");
    }
    let mut rel = HashSet::new();
    for s in &samples {
        check_scene(s);
        check_answer(s, false);
        check_refs(s);
        if s.family == Family::RelativePosition {
            rel.insert(s.answers[0].clone());
        }
    }
    assert_eq!(rel.len(), 4, "all four directions appear: {rel:?}");
    // count answers cycle through 1..=max_count (3) in generation order
    let counts: Vec<&str> = samples
        .iter()
        .filter(|s| s.family == Family::Count)
        .map(|s| s.answers[0].as_str())
        .collect();
    for (i, a) in counts.iter().enumerate() {
        assert_eq!(*a, ["1", "2", "3"][i % 3], "count sample {i}");
    }
    // the size word appears when the shape alone is ambiguous
    assert!(
        samples
            .iter()
            .any(|s| s.family == Family::Color && s.question.split(' ').count() == 6)
    );
    // clutter, textures and signs all occur outside ReadText too
    assert!(samples.iter().any(|s| !s.scene.clutter.is_empty()));
    assert!(
        samples
            .iter()
            .any(|s| s.scene.background.texture != Texture::Plain)
    );
    let others: Vec<_> = samples
        .iter()
        .filter(|s| s.family != Family::ReadText)
        .collect();
    let with_sign = others.iter().filter(|s| s.scene.sign().is_some()).count();
    assert!(
        (60..=140).contains(&with_sign),
        "{with_sign} of {} scenes carry a sign",
        others.len()
    );
}

/// `max_count = 0` asks about whatever the scene holds: mostly one of a kind, and never a count
/// capped by a plan (`max_count` is also capped by `max_objects`).
#[test]
fn count_plans_follow_max_count() {
    let only_count = ShapesConfig {
        family_weights: [0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
        ..cfg()
    };
    let free = generate(
        Split::Train,
        60,
        4,
        &ShapesConfig {
            max_count: 0,
            ..only_count.clone()
        },
    )
    .unwrap();
    let ones = free.iter().filter(|s| s.answers[0] == "1").count();
    assert!(ones > 30, "{ones} of 60 free counts are one");
    let capped = ShapesConfig {
        max_count: 5,
        max_objects: 2,
        ..only_count
    };
    let s = generate(Split::Train, 6, 4, &capped).unwrap();
    let got: Vec<&str> = s.iter().map(|s| s.answers[0].as_str()).collect();
    assert_eq!(got, ["1", "2", "1", "2", "1", "2"]);
    for x in free.iter().chain(&s) {
        check_answer(x, false);
    }
}

/// Families parse from the names the exported files use (`distill shapes --ground-answers`); an
/// unknown one names every valid choice.
#[test]
fn families_parse_from_their_names() {
    for f in Family::ALL {
        assert_eq!(f.name().parse::<Family>(), Ok(f));
    }
    let e = "colour".parse::<Family>().unwrap_err();
    assert!(
        e.contains("`colour`") && e.contains("color, shape, count"),
        "{e}"
    );
}

#[test]
fn family_weights_select_families() {
    let c = ShapesConfig {
        family_weights: [0.0, 0.0, 0.0, 0.0, 1.0, 3.0],
        sign_prob: 0.0,
        ..cfg()
    };
    let s = generate(Split::Train, 40, 1, &c).unwrap();
    assert_eq!(
        s.iter().filter(|s| s.family == Family::ReadText).count(),
        30
    );
    assert_eq!(
        s.iter()
            .filter(|s| s.family == Family::RelativePosition)
            .count(),
        10
    );
    for x in &s {
        check_answer(x, false);
        // sign_prob 0: only ReadText scenes carry a sign
        assert_eq!(x.scene.sign().is_some(), x.family == Family::ReadText);
    }
}

/// Patches touched by the non-black pixels of `objects` rendered alone on black.
fn touched(objects: &[Object], size: u32, patch: u32) -> Vec<bool> {
    let g = size / patch;
    let mut m = vec![false; (g * g) as usize];
    for o in objects {
        let scene = Scene {
            background: Background {
                color: [0, 0, 0],
                texture: Texture::Plain,
            },
            clutter: vec![],
            objects: vec![o.clone()],
        };
        let img = scene.render(size);
        for (x, y, p) in img.enumerate_pixels() {
            if p.0 != [0, 0, 0] && x / patch < g && y / patch < g {
                m[((y / patch) * g + x / patch) as usize] = true;
            }
        }
    }
    m
}

#[test]
fn masks_cover_exactly_the_patches_the_objects_touch() {
    let samples = generate(Split::Test, 30, 5, &cfg()).unwrap();
    let mut checked = 0;
    for (size, patch) in [(336, 14), (30, 6), (64, 8), (50, 8)] {
        for s in &samples {
            let mask = s.relevance_mask(size, patch);
            let g = (size / patch) as usize;
            assert_eq!(mask.len(), g * g);
            let objs: Vec<Object> = s
                .referenced
                .iter()
                .map(|&i| s.scene.objects[i].clone())
                .collect();
            assert_eq!(
                mask,
                touched(&objs, size, patch),
                "{} at {size}/{patch}",
                s.id
            );
            if s.referenced.is_empty() {
                assert!(s.relevance(size, patch).is_none() && mask.iter().all(|b| !b));
            } else {
                assert_eq!(s.relevance(size, patch), Some(mask.clone()));
                if size == 336 {
                    assert!(
                        mask.iter().any(|&b| b) && mask.iter().any(|&b| !b),
                        "{}",
                        s.id
                    );
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 80);
    assert!(samples[0].relevance_mask(336, 0).is_empty());
}

#[test]
fn object_masks_match_pixel_centre_tests_over_the_whole_canvas() {
    for s in generate(Split::Train, 12, 2, &cfg()).unwrap() {
        for o in &s.scene.objects {
            for size in [17, 64] {
                let m = o.mask(size);
                for y in 0..size {
                    for x in 0..size {
                        let (u, v) = (
                            (x as f32 + 0.5) / size as f32,
                            (y as f32 + 0.5) / size as f32,
                        );
                        assert_eq!(m[(y * size + x) as usize], o.contains(u, v));
                    }
                }
            }
        }
    }
}

/// Reads a sign's text from a render by sampling the centre of every font cell.
fn read_sign(img: &image::RgbImage, o: &Object) -> String {
    let fineprune::bench::shapes::ObjectKind::Sign { text, glyph: g, .. } = &o.kind else {
        panic!("not a sign")
    };
    let size = img.width() as f32;
    let x0 = o.cx - o.hw + SIGN_PAD as f32 * g;
    let y0 = o.cy - o.hh + SIGN_PAD as f32 * g;
    let mut out = String::new();
    for k in 0..text.chars().count() {
        let mut rows = [0u8; 7];
        for (r, row) in rows.iter_mut().enumerate() {
            for c in 0..5 {
                let u = x0 + ((k * 6 + c) as f32 + 0.5) * g;
                let v = y0 + (r as f32 + 0.5) * g;
                let p = img.get_pixel((u * size) as u32, (v * size) as u32);
                if p.0 == SIGN_INK {
                    *row |= 0x10 >> c;
                }
            }
        }
        let c = SIGN_CHARSET
            .chars()
            .find(|&c| glyph(c) == Some(rows))
            .unwrap_or('?');
        out.push(c);
    }
    out
}

#[test]
fn sign_text_reads_back_from_the_rendered_pixels() {
    let c = ShapesConfig {
        family_weights: [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
        ..cfg()
    };
    for s in generate(Split::Test, 24, 9, &c).unwrap() {
        let img = s.scene.render(336);
        let sign = &s.scene.objects[s.referenced[0]];
        assert_eq!(read_sign(&img, sign), s.answers[0], "{}", s.id);
    }
}

#[test]
fn eval_export_round_trips_and_train_export_is_llava_json() {
    let samples = generate(Split::Test, 14, 4, &cfg()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("eval");
    export_llava_eval(&samples, &dir, 48, 48).unwrap();
    let back = read_llava_eval(&dir).unwrap();
    assert_eq!(back, samples);
    for (a, b) in back.iter().zip(&samples) {
        assert_eq!(a.relevance_mask(336, 14), b.relevance_mask(336, 14));
        let png = std::fs::read(dir.join("images").join(b.image_file())).unwrap();
        assert_eq!(png, b.scene.png(48).unwrap());
        let img = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(img, b.scene.render(48));
    }
    let q = std::fs::read_to_string(dir.join("questions.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(q.lines().next().unwrap()).unwrap();
    assert_eq!(first["question_id"], samples[0].id.as_str());
    assert_eq!(first["image"], format!("{}.png", samples[0].id).as_str());
    assert_eq!(first["text"], samples[0].question.as_str());
    assert_eq!(first["category"], samples[0].family.name());

    let tdir = tmp.path().join("train");
    let at32 = ShapesConfig {
        image_size: 32,
        ..cfg()
    };
    export_llava_train(&samples, &tdir, &at32, &TrainTurns::default()).unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tdir.join("train.json")).unwrap()).unwrap();
    let recs = v.as_array().unwrap();
    assert_eq!(recs.len(), samples.len());
    for (r, s) in recs.iter().zip(&samples) {
        assert_eq!(r["id"], s.id.as_str());
        assert_eq!(r["image"], s.image_file().as_str());
        let conv = r["conversations"].as_array().unwrap();
        assert_eq!(conv[0]["from"], "human");
        assert_eq!(
            conv[0]["value"],
            format!("<image>\n{}{}", s.question, SHORT_ANSWER).as_str()
        );
        assert_eq!(conv[1]["from"], "gpt");
        assert_eq!(conv[1]["value"], s.answers[0].as_str());
        assert_eq!(conv.len(), 2);
        assert!(tdir.join("images").join(s.image_file()).is_file());
    }

    // Described: the same first turn, then the caption turn.
    let ddir = tmp.path().join("described");
    let described = TrainTurns {
        describe: true,
        ..TrainTurns::default()
    };
    export_llava_train(&samples, &ddir, &at32, &described).unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ddir.join("train.json")).unwrap()).unwrap();
    for (r, (plain, s)) in v.as_array().unwrap().iter().zip(recs.iter().zip(&samples)) {
        let conv = r["conversations"].as_array().unwrap();
        assert_eq!(conv[..2], plain["conversations"].as_array().unwrap()[..]);
        assert_eq!(conv[2]["value"], DESCRIBE);
        assert_eq!(conv[3]["value"], s.scene.caption().as_str());
    }
    // With shape colours and positions too: the caption turn, then the shape-by-shape colours,
    // then the shape-by-shape places.
    let sdir = tmp.path().join("shape-lists");
    let listed = TrainTurns {
        shape_colors: true,
        shape_positions: true,
        ..described
    };
    export_llava_train(&samples, &sdir, &at32, &listed).unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sdir.join("train.json")).unwrap()).unwrap();
    for (r, s) in v.as_array().unwrap().iter().zip(&samples) {
        let conv = r["conversations"].as_array().unwrap();
        assert_eq!(conv.len(), 8);
        assert_eq!(conv[3]["value"], s.scene.caption().as_str());
        assert_eq!(conv[4]["value"], SHAPE_COLORS);
        assert_eq!(conv[5]["value"], s.scene.shape_colors().as_str());
        assert_eq!(conv[6]["value"], SHAPE_POSITIONS);
        assert_eq!(conv[7]["value"], s.scene.shape_positions().as_str());
    }

    // All families: the same first turn, then one question of every other family the scene
    // allows, each answered correctly; the file is the same on every export.
    let all = TrainTurns {
        all_families: true,
        ..TrainTurns::default()
    };
    let adir = tmp.path().join("all");
    export_llava_train(&samples, &adir, &at32, &all).unwrap();
    let bytes = std::fs::read(adir.join("train.json")).unwrap();
    export_llava_train(&samples, &adir, &at32, &all).unwrap();
    assert_eq!(std::fs::read(adir.join("train.json")).unwrap(), bytes);
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let (mut orders, mut turns) = (HashSet::new(), 0);
    for (r, (plain, s)) in v.as_array().unwrap().iter().zip(recs.iter().zip(&samples)) {
        let conv = r["conversations"].as_array().unwrap();
        assert_eq!(conv[..2], plain["conversations"].as_array().unwrap()[..]);
        let mut families = vec![s.family];
        for pair in conv[2..].chunks(2) {
            assert_eq!(
                (&pair[0]["from"], &pair[1]["from"]),
                (&"human".into(), &"gpt".into())
            );
            let q = pair[0]["value"]
                .as_str()
                .unwrap()
                .strip_suffix(SHORT_ANSWER)
                .unwrap();
            assert!(!q.contains("<image>"), "{q}");
            let family = family_of(q);
            assert!(
                !families.contains(&family),
                "{}: {family} asked twice",
                s.id
            );
            families.push(family);
            let turn = Sample {
                question: q.to_string(),
                answers: vec![pair[1]["value"].as_str().unwrap().to_string()],
                family,
                pope_kind: None,
                ..s.clone()
            };
            check_answer(&turn, true);
        }
        // no question gives another's answer away
        let qa: Vec<(&str, &str)> = conv
            .chunks(2)
            .map(|p| {
                (
                    p[0]["value"].as_str().unwrap(),
                    p[1]["value"].as_str().unwrap(),
                )
            })
            .collect();
        for (i, (_, a)) in qa.iter().enumerate() {
            for (j, (q, _)) in qa.iter().enumerate() {
                let mut words = q.split(|c: char| !c.is_alphanumeric());
                assert!(
                    i == j
                        || !words.any(|w| {
                            w.eq_ignore_ascii_case(a) || w.eq_ignore_ascii_case(&format!("{a}s"))
                        }),
                    "{}: `{q}` gives away `{a}`",
                    s.id
                );
            }
        }
        turns += families.len();
        orders.insert(families[1..].to_vec());
    }
    assert!(
        turns >= 3 * samples.len(),
        "{turns} questions for {} images",
        samples.len()
    );
    assert!(orders.len() > 1, "extra turns are shuffled");
}

/// The family a question's wording belongs to.
fn family_of(q: &str) -> Family {
    if q.starts_with("What color is ") {
        Family::Color
    } else if q.starts_with("What shape is ") {
        Family::Shape
    } else if q.starts_with("How many ") {
        Family::Count
    } else if q.starts_with("Is there ") {
        Family::Existence
    } else if q.starts_with("Is ") {
        Family::RelativePosition
    } else {
        assert_eq!(q, "What does the sign say?");
        Family::ReadText
    }
}

#[test]
fn caption_lists_every_shape_left_to_right_and_the_sign() {
    let shape = |shape, color, size, cx: f32, cy: f32| Object {
        kind: ObjectKind::Shape { shape, color, size },
        cx,
        cy,
        hw: 0.05,
        hh: 0.05,
    };
    let scene = Scene {
        background: Background {
            color: [240, 240, 240],
            texture: Texture::Plain,
        },
        clutter: vec![],
        objects: vec![
            shape(Shape::Star, Color::Red, Size::Large, 0.7, 0.5),
            shape(Shape::Circle, Color::Blue, Size::Small, 0.2, 0.1),
            shape(Shape::Square, Color::Green, Size::Medium, 0.34, 0.99),
            Object::sign("P2H", 0.01, 0.5, 0.1),
        ],
    };
    assert_eq!(
        scene.caption(),
        "small blue circle, medium green square, large red star. The sign says P2H."
    );
    assert_eq!(scene.shape_colors(), "circle blue, square green, star red.");
    // Centres in thirds of the image: row, then column.
    assert_eq!(
        scene.shape_positions(),
        "circle top left, square bottom center, star middle right."
    );
    let no_sign = Scene {
        objects: scene.objects[..3].to_vec(),
        ..scene
    };
    assert_eq!(
        no_sign.caption(),
        "small blue circle, medium green square, large red star."
    );
    // The reverse lookup, shape name first; signs are not shapes.
    assert_eq!(
        no_sign.shape_colors(),
        "circle blue, square green, star red."
    );
}

/// Exports a few samples, applies `damage` to the directory and returns the read error's message.
fn damaged(damage: impl Fn(&Path)) -> String {
    let samples = generate(Split::Val, 4, 1, &cfg()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    export_llava_eval(&samples, tmp.path(), 16, 16).unwrap();
    damage(tmp.path());
    read_llava_eval(tmp.path()).unwrap_err().to_string()
}

fn edit_line(path: &Path, line: usize, f: impl Fn(&str) -> String) {
    let text = std::fs::read_to_string(path).unwrap();
    let lines: Vec<String> = text
        .lines()
        .enumerate()
        .map(|(i, l)| if i + 1 == line { f(l) } else { l.to_string() })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

#[test]
fn damaged_exports_give_errors_naming_file_and_line() {
    let e = damaged(|d| std::fs::remove_file(d.join("questions.jsonl")).unwrap());
    assert!(
        e.contains("missing questions.jsonl") && e.contains("questions.jsonl"),
        "{e}"
    );

    let e = damaged(|d| edit_line(&d.join("questions.jsonl"), 2, |_| "{not json".into()));
    assert!(e.contains("questions.jsonl") && e.contains("line 2"), "{e}");

    let e = damaged(|d| std::fs::write(d.join("scenes.jsonl"), [0xff, 0xfe, b'\n']).unwrap());
    assert!(e.contains("scenes.jsonl"), "{e}");

    let e = damaged(|d| {
        edit_line(&d.join("answers.jsonl"), 3, |l| {
            l.replace("\"family\"", "\"famly\"")
        })
    });
    assert!(e.contains("answers.jsonl") && e.contains("line 3"), "{e}");

    let e = damaged(|d| edit_line(&d.join("answers.jsonl"), 1, |_| String::new()));
    assert!(
        e.contains("answers.jsonl") && e.contains("no answer") && e.contains("line 1"),
        "{e}"
    );

    let e = damaged(|d| {
        let p = d.join("scenes.jsonl");
        let text = std::fs::read_to_string(&p).unwrap();
        let first = text.lines().next().unwrap().to_string();
        std::fs::write(&p, format!("{text}{first}\n")).unwrap();
    });
    assert!(
        e.contains("scenes.jsonl") && e.contains("line 5") && e.contains("repeats"),
        "{e}"
    );

    let e = damaged(|d| {
        edit_line(&d.join("answers.jsonl"), 2, |l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["referenced"] = serde_json::json!([99]);
            v.to_string()
        })
    });
    assert!(
        e.contains("answers.jsonl") && e.contains("line 2") && e.contains("99"),
        "{e}"
    );

    let e = damaged(|d| {
        edit_line(&d.join("answers.jsonl"), 1, |l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["family"] = "read_text".into();
            v.to_string()
        })
    });
    assert!(
        e.contains("answers.jsonl") && e.contains("line 1") && e.contains("category"),
        "{e}"
    );

    let e = damaged(|d| {
        let img = std::fs::read_dir(d.join("images"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        std::fs::remove_file(img.path()).unwrap();
    });
    assert!(e.contains("image") && e.contains(".png"), "{e}");

    let e = damaged(|d| {
        edit_line(&d.join("answers.jsonl"), 4, |l| {
            l.replace("val-1-000003", "val-1-000099")
        })
    });
    assert!(
        e.contains("answers.jsonl") && e.contains("val-1-000003"),
        "{e}"
    );

    let tmp = tempfile::tempdir().unwrap();
    match read_llava_eval(&tmp.path().join("nowhere")) {
        Err(Error::MissingFile { path, .. }) => assert!(path.ends_with("questions.jsonl")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn sign_characters_outside_the_font_are_rejected_on_read() {
    let c = ShapesConfig {
        family_weights: [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
        ..cfg()
    };
    let samples = generate(Split::Val, 2, 1, &c).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    export_llava_eval(&samples, tmp.path(), 16, 16).unwrap();
    let text = samples[1].answers[0].clone();
    edit_line(&tmp.path().join("scenes.jsonl"), 2, |l| {
        l.replace(&format!("\"text\":\"{text}\""), "\"text\":\"a!\"")
    });
    let e = read_llava_eval(tmp.path()).unwrap_err().to_string();
    assert!(
        e.contains("scenes.jsonl") && e.contains("line 2") && e.contains("'a'"),
        "{e}"
    );
}

#[test]
fn export_rejects_duplicate_ids_and_zero_size() {
    let mut samples = generate(Split::Val, 2, 1, &cfg()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    assert!(
        export_llava_eval(&samples, tmp.path(), 0, 0)
            .unwrap_err()
            .to_string()
            .contains("image_size")
    );
    samples[1].id = samples[0].id.clone();
    let at16 = ShapesConfig {
        image_size: 16,
        ..cfg()
    };
    let e = export_llava_train(&samples, tmp.path(), &at16, &TrainTurns::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("duplicate id"), "{e}");
}

/// A count from a flag or config (`prune-bench --data shapes:N`, `distill shapes --train N`) is
/// refused above `MAX_SAMPLES` instead of allocating every plan first.
#[test]
fn absurd_sample_counts_are_refused() {
    use fineprune::bench::shapes::{MAX_SAMPLES, generate, generate_one};
    let cfg = ShapesConfig::default();
    for err in [
        generate(Split::Test, MAX_SAMPLES + 1, 0, &cfg).map(|_| ()),
        generate(Split::Train, usize::MAX, 0, &cfg).map(|_| ()),
        generate_one(Split::Test, usize::MAX, 0, &cfg).map(|_| ()),
    ] {
        let msg = err.unwrap_err().to_string();
        assert!(msg.contains("at most 1000000"), "{msg}");
    }
}

/// A render size from a flag or `shapes_config.json` is refused above `MAX_IMAGE_SIZE`
/// (`distill shapes --image-size 1000000` once aborted asking for 3 TB).
#[test]
fn absurd_image_sizes_are_refused() {
    use fineprune::bench::shapes::MAX_IMAGE_SIZE;
    let cfg = ShapesConfig {
        image_size: 1_000_000,
        ..ShapesConfig::default()
    };
    let msg = cfg.validate().unwrap_err().to_string();
    assert!(
        msg.contains("image_size") && msg.contains("1..=4096"),
        "{msg}"
    );
    let ok = ShapesConfig {
        image_size: MAX_IMAGE_SIZE,
        ..ShapesConfig::default()
    };
    ok.validate().unwrap();
}

/// `(x0, y0, x1, y1)`: the first and last pixel columns and rows of a mask `width` wide.
fn pixel_extent(mask: &[bool], width: u32) -> (u32, u32, u32, u32) {
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
    for i in (0..mask.len()).filter(|&i| mask[i]) {
        let (x, y) = (i as u32 % width, i as u32 / width);
        (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
    }
    (x0, y0, x1, y1)
}

/// Wide (aspect 2) and tall (0.5) scenes: every circle, square and sign keeps its shape in the
/// pixels of a `width() x image_size` render, sizes follow the shorter side, and generation and
/// rendering are deterministic; at aspect 1 nothing says so in the JSON.
#[test]
fn non_square_scenes_keep_shapes_isotropic_in_pixels() {
    for aspect in [2.0, 0.5] {
        let c = ShapesConfig {
            aspect,
            image_size: 160,
            sign_prob: 1.0,
            ..cfg()
        };
        let (w, h) = (c.width(), c.image_size);
        assert_eq!((w, h), if aspect > 1.0 { (320, 160) } else { (80, 160) });
        let samples = generate(Split::Test, 24, 3, &c).unwrap();
        assert_eq!(samples, generate(Split::Test, 24, 3, &c).unwrap());
        let (mut circles, mut squares) = (0, 0);
        for s in &samples {
            assert_eq!(s.scene.png_at(w, h).unwrap(), s.scene.png_at(w, h).unwrap());
            let img = s.scene.render_at(w, h);
            assert_eq!(img.dimensions(), (w, h));
            for o in &s.scene.objects {
                let (x0, y0, x1, y1) = pixel_extent(&o.mask_at(w, h), w);
                let (pw, ph) = ((x1 - x0 + 1) as f32, (y1 - y0 + 1) as f32);
                match (o.shape(), &o.kind) {
                    (Some((Shape::Circle, _, z)), _) | (Some((Shape::Square, _, z)), _) => {
                        assert!((pw - ph).abs() <= 1.0, "{}: {pw}x{ph} px", s.id);
                        // sized by the shorter side (160 or 80 pixels)
                        let side = w.min(h) as f32;
                        let ex = if o.shape().unwrap().0 == Shape::Circle {
                            1.0
                        } else {
                            0.88
                        };
                        assert!((pw - 2.0 * ex * z.radius() * side).abs() <= 2.0, "{}", s.id);
                        if o.shape().unwrap().0 == Shape::Circle {
                            circles += 1;
                        } else {
                            squares += 1;
                        }
                    }
                    (None, ObjectKind::Sign { text, glyph, .. }) => {
                        // (6·len − 1 + 4) x 11 square font pixels of glyph · shorter side
                        let px = glyph * w.min(h) as f32;
                        let cols = (text.chars().count() * 6 - 1 + 2 * SIGN_PAD) as f32;
                        let rows = (7 + 2 * SIGN_PAD) as f32;
                        assert!(
                            (pw - cols * px).abs() <= 1.5,
                            "{}: {pw} vs {}",
                            s.id,
                            cols * px
                        );
                        assert!(
                            (ph - rows * px).abs() <= 1.5,
                            "{}: {ph} vs {}",
                            s.id,
                            rows * px
                        );
                    }
                    _ => {}
                }
            }
        }
        assert!(
            circles > 5 && squares > 3,
            "{circles} circles, {squares} squares"
        );
        let json = serde_json::to_string(&samples[0].scene).unwrap();
        assert!(json.contains("\"aspect\""), "{json}");
    }
    let square = generate(Split::Test, 4, 3, &cfg()).unwrap();
    assert!(!serde_json::to_string(&square).unwrap().contains("aspect"));
    assert!(!serde_json::to_string(&cfg()).unwrap().contains("aspect"));
    for bad in [0.1, 6.0, f32::NAN] {
        let c = ShapesConfig {
            aspect: bad,
            ..cfg()
        };
        let e = generate(Split::Test, 1, 0, &c).unwrap_err().to_string();
        assert!(e.contains("aspect"), "{e}");
    }
    let wide = ShapesConfig {
        aspect: 5.0,
        image_size: 1000,
        ..cfg()
    };
    assert!(wide.validate().unwrap_err().to_string().contains("aspect"));
}

/// One square on a 40x20 render, 10-pixel patches: a 2 x 4 grid, by hand.
#[test]
fn relevance_masks_on_a_non_square_patch_grid_by_hand() {
    let o = Object {
        kind: ObjectKind::Shape {
            shape: Shape::Square,
            color: Color::Red,
            size: Size::Large,
        },
        cx: 0.5,
        cy: 0.5,
        hw: 0.1,
        hh: 0.2,
    };
    // x in [0.4, 0.6]: pixel columns 16..=23 (centres 16.5/40 to 23.5/40), patch columns 1, 2;
    // y in [0.3, 0.7]: rows 6..=13 (of 20), patch rows 0, 1.
    let scene = Scene {
        background: Background {
            color: [0, 0, 0],
            texture: Texture::Plain,
        },
        clutter: vec![],
        objects: vec![o.clone()],
    };
    let (x0, y0, x1, y1) = pixel_extent(&o.mask_at(40, 20), 40);
    assert_eq!((x0, y0, x1, y1), (16, 6, 23, 13));
    #[rustfmt::skip]
    let want = vec![
        false, true, true, false,
        false, true, true, false,
    ];
    assert_eq!(scene.relevance_mask_at(&[0], 40, 20, 10), want);
    // Pixels past the last whole patch are ignored: 12-pixel patches make a 1 x 3 grid, and
    // columns 16..=23 lie in its second column.
    assert_eq!(
        scene.relevance_mask_at(&[0], 40, 20, 12),
        vec![false, true, false]
    );
    // Nothing referenced, nothing relevant; a patch of 0 gives no grid.
    assert_eq!(scene.relevance_mask_at(&[], 40, 20, 10), vec![false; 8]);
    assert!(scene.relevance_mask_at(&[0], 40, 20, 0).is_empty());
    // The square case is the old one.
    assert_eq!(
        scene.relevance_mask(&[0], 40, 10),
        scene.relevance_mask_at(&[0], 40, 40, 10)
    );
}

/// LLaVA-NeXT's tokens of a 60 x 40 (w x h) image at tile 30, patch 6, pinpoints [[30, 60],
/// [60, 30], [60, 60]], one square referenced, by hand.
#[test]
fn anyres_relevance_by_hand() {
    let scene = Scene {
        background: Background {
            color: [0, 0, 0],
            texture: Texture::Plain,
        },
        clutter: vec![],
        objects: vec![Object {
            kind: ObjectKind::Shape {
                shape: Shape::Square,
                color: Color::Red,
                size: Size::Large,
            },
            cx: 0.7,
            cy: 0.61,
            hw: 0.1,
            hh: 0.15,
        }],
    };
    let pins = [(30, 60), (60, 30), (60, 60)];
    let got = scene
        .anyres_relevance(&[0], (40, 60), &pins, (30, 6))
        .unwrap();
    // Best resolution 60x60 (it keeps 60x40 pixels whole): a 2 x 2 grid of tiles, the image
    // resized to 60x40 and centred 10 pixels down; unpadded, the 10 x 10 feature map keeps rows
    // 2..8 (int(40 · 10/60) = 6 rows). 25 base tokens + 6 rows of 10 and a newline = 91.
    assert_eq!(got.len(), 91);
    let mut want: Vec<Option<bool>> = vec![Some(false); 25];
    // Base tile (the scene at 30x30): x in [0.6, 0.8] -> pixels 18..=23, patch column 3;
    // y in [0.46, 0.76] -> pixels 14..=22, patch rows 2 and 3.
    want[2 * 5 + 3] = Some(true);
    want[3 * 5 + 3] = Some(true);
    // Grid: the scene at 60x40 shifted down 10: x pixels 36..=47 (patch columns 6, 7), y
    // pixels 18..=29, on the canvas 28..=39 (patch rows 4, 5, 6), packed rows 2, 3, 4.
    for row in 0..6 {
        for col in 0..10 {
            want.push(Some((2..=4).contains(&row) && (6..=7).contains(&col)));
        }
        want.push(None);
    }
    assert_eq!(got, want);
    // Bad geometry is an error naming the pinpoints, never a panic.
    let e = scene
        .anyres_relevance(&[0], (40, 60), &[], (30, 6))
        .unwrap_err();
    assert!(e.to_string().contains("image_grid_pinpoints"), "{e}");
    let e = scene
        .anyres_relevance(&[0], (40, 60), &pins, (30, 7))
        .unwrap_err();
    assert!(e.to_string().contains("image_grid_pinpoints"), "{e}");
}
