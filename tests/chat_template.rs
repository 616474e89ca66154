//! Chats rendered with the model's own chat template (src/model/chat.rs) against HF transformers'
//! `processor.apply_chat_template(..., tokenize=True)` on the fixture models
//! (`tests/reference/gen_chat.py` → `chat_ref.json`): rendered text and token ids exactly, image
//! and text segments; and the errors bad chats and bad templates get.

use fineprune::model::chat::{
    ChatMessage, ChatPart, ChatTemplate, RenderedChat, build_chat_prompt, chat_prompt,
};
use fineprune::model::template::{ImageSlot, Prompt, Segment};
use fineprune::{Error, Model};
use serde::Deserialize;
use std::path::{Path, PathBuf};

fn reference_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference")
}

#[derive(Deserialize)]
struct Case {
    fixture: String,
    name: String,
    chat_template: Option<String>,
    add_generation_prompt: bool,
    messages: Vec<ChatMessage>,
    rendered: String,
    input_ids: Vec<u32>,
    image_tokens: usize,
}

#[derive(Deserialize)]
struct Reference {
    cases: Vec<Case>,
}

/// A fixture model with its chat template and image slot.
struct Fixture {
    model: Model,
    template: ChatTemplate,
    slot: ImageSlot,
}

fn fixture(name: &str) -> Fixture {
    let dir = reference_dir().join(name);
    let model = Model::load(&dir).unwrap();
    let template = ChatTemplate::from_model_dir(&dir).unwrap().unwrap();
    let v = model.vision.as_ref().unwrap();
    let slot = ImageSlot {
        token: model
            .tokenizer
            .id_to_token(v.config.image_token_id)
            .unwrap(),
        count: v.image_tokens(),
    };
    Fixture {
        model,
        template,
        slot,
    }
}

fn build(f: &Fixture, chat: &RenderedChat) -> fineprune::Result<Prompt> {
    build_chat_prompt(&f.model.tokenizer, chat, Some(&f.slot), 256)
}

/// The texts of the runs of consecutive `Text` positions.
fn text_runs(f: &Fixture, p: &Prompt) -> Vec<String> {
    let mut runs: Vec<Vec<u32>> = Vec::new();
    let mut prev = None;
    for (&id, &s) in p.ids.iter().zip(&p.segments) {
        if s == Segment::Text {
            if prev != Some(Segment::Text) {
                runs.push(Vec::new());
            }
            runs.last_mut().unwrap().push(id);
        }
        prev = Some(s);
    }
    runs.iter()
        .map(|r| f.model.tokenizer.decode(r, false).unwrap())
        .collect()
}

#[test]
fn chats_match_transformers() {
    let text = std::fs::read_to_string(reference_dir().join("chat_ref.json")).unwrap();
    let reference: Reference = serde_json::from_str(&text).unwrap();
    assert_eq!(reference.cases.len(), 18);
    for name in ["llava_gqa", "llava_tied"] {
        let f = fixture(name);
        for case in reference.cases.iter().filter(|c| c.fixture == name) {
            let what = format!("{name} {}", case.name);
            let template = match &case.chat_template {
                Some(src) => ChatTemplate::new(src)
                    .unwrap()
                    .with_special_tokens(f.template.special_tokens().clone()),
                None => f.template.clone(),
            };
            let chat = template
                .render_chat(&case.messages, case.add_generation_prompt)
                .unwrap();
            assert_eq!(chat.text, case.rendered, "{what}: rendered");
            let prompt = build(&f, &chat).unwrap();
            assert_eq!(prompt.ids, case.input_ids, "{what}: ids");
            if case.add_generation_prompt {
                let direct = chat_prompt(
                    &template,
                    &f.model.tokenizer,
                    &case.messages,
                    Some(&f.slot),
                    256,
                );
                assert_eq!(direct.unwrap(), prompt, "{what}: chat_prompt");
            }
            // segments: the image tokens, System up to the first one, Text = the user's words
            let images = prompt.image_positions();
            assert_eq!(images.len(), case.image_tokens, "{what}: image tokens");
            assert_eq!(images.len(), chat.images * f.slot.count, "{what}");
            let first_other = prompt.segments.iter().position(|&s| s != Segment::System);
            if let Some(&first) = images.first() {
                assert_eq!(first_other, Some(first), "{what}: System ends at the image");
            }
            let user_texts: Vec<String> = (case.messages.iter())
                .filter(|m| m.role == "user")
                .flat_map(|m| &m.content)
                .filter_map(|p| match p {
                    ChatPart::Text(t) => Some(t.trim().to_string()),
                    ChatPart::Image => None,
                })
                .collect();
            let runs = text_runs(&f, &prompt);
            let words = |v: &[String]| v.join(" ").split_whitespace().collect::<Vec<_>>().join(" ");
            assert_eq!(
                words(&runs),
                words(&user_texts),
                "{what}: Text runs {runs:?}"
            );
            if images.is_empty() {
                let first_text = prompt.segments.iter().position(|&s| s == Segment::Text);
                assert_eq!(first_other, first_text, "{what}: System ends at the text");
            }
        }
    }
}

fn prompt_err(r: fineprune::Result<impl std::fmt::Debug>) -> String {
    match r {
        Err(e @ Error::Prompt(_)) => e.to_string(),
        other => panic!("expected a prompt error, got {other:?}"),
    }
}

#[test]
fn image_placeholders_must_match_the_images() {
    let f = fixture("llava_tied");
    let tok = &f.model.tokenizer;
    let two = [ChatMessage {
        role: "user".into(),
        content: vec![
            ChatPart::Image,
            ChatPart::Image,
            ChatPart::Text("Hi".into()),
        ],
    }];
    // a template that drops images
    let text_only = ChatTemplate::new(
        "{% for m in messages %}{% for p in m.content if p.type == 'text' %}{{ p.text }}{% endfor %}{% endfor %}",
    )
    .unwrap();
    let e = prompt_err(chat_prompt(&text_only, tok, &two, Some(&f.slot), 256));
    assert!(
        e.contains("the chat has 2 image(s) but the template rendered 0 `<image>` placeholder(s)"),
        "{e}"
    );
    // the user typed the placeholder: one image, two placeholders
    let typed = [ChatMessage::user_with_image("what is <image>?")];
    let e = prompt_err(chat_prompt(&f.template, tok, &typed, Some(&f.slot), 256));
    assert!(e.contains("1 image(s) but the template rendered 2"), "{e}");
    // an image for a model without a vision tower
    let e = prompt_err(chat_prompt(&f.template, tok, &two, None, 256));
    assert!(e.contains("no vision tower"), "{e}");
    // without images a vision model takes text-only chats; too long a prompt names both lengths
    let one = [ChatMessage::user_with_image("Hi")];
    let p = chat_prompt(&f.template, tok, &one, Some(&f.slot), 256).unwrap();
    let e = prompt_err(chat_prompt(
        &f.template,
        tok,
        &one,
        Some(&f.slot),
        p.ids.len() - 1,
    ));
    assert!(
        e.contains(&format!("{} tokens", p.ids.len()))
            && e.contains(&format!("context of {}", p.ids.len() - 1)),
        "{e}"
    );
    // an image slot whose token the tokenizer lacks
    let bad = ImageSlot {
        token: "<img>".into(),
        count: 3,
    };
    let chat = f.template.render_chat(&one, true).unwrap();
    let e = prompt_err(build(
        &Fixture {
            slot: bad,
            ..fixture("llava_tied")
        },
        &chat,
    ));
    assert!(e.contains("<img>"), "{e}");
    let empty = ImageSlot {
        token: "<image>".into(),
        count: 0,
    };
    let e = prompt_err(build_chat_prompt(tok, &chat, Some(&empty), 256));
    assert!(e.contains("has no tokens"), "{e}");
}

#[test]
fn bad_chats_and_templates_are_errors() {
    let f = fixture("llava_gqa");
    let e = prompt_err(f.template.render(&[], true));
    assert!(e.contains("no messages"), "{e}");
    let e = prompt_err(f.template.render(&[ChatMessage::new(" ", "hi")], true));
    assert!(e.contains("message 0 has an empty role"), "{e}");
    // raise_exception: the template's own message
    let strict = ChatTemplate::new(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with the user') }}{% endif %}ok",
    )
    .unwrap();
    assert_eq!(
        strict.render(&[ChatMessage::user("hi")], true).unwrap(),
        "ok"
    );
    let e = prompt_err(strict.render(&[ChatMessage::assistant("hi")], true));
    assert!(e.contains("Conversations must start with the user"), "{e}");
    // undefined variables print as nothing (as in Jinja); their attributes are errors
    let t = ChatTemplate::new(
        "[{{ nothing }}]{% for x in nothing %}x{% endfor %}{% if nothing %}y{% endif %}",
    )
    .unwrap();
    assert_eq!(t.render(&[ChatMessage::user("hi")], true).unwrap(), "[]");
    let t = ChatTemplate::new("line 1\n{{ nothing.attr }}").unwrap();
    let e = prompt_err(t.render(&[ChatMessage::user("hi")], true));
    assert!(e.contains("<chat template> (line 2)"), "{e}");
}

/// A copy of a fixture's tokenizer/template files in a temp dir, to edit.
fn template_dir(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for file in [
        "chat_template.json",
        "chat_template.jinja",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        let src = reference_dir().join(name).join(file);
        if src.is_file() {
            std::fs::copy(src, tmp.path().join(file)).unwrap();
        }
    }
    tmp
}

#[test]
fn templates_are_found_as_transformers_finds_them() {
    let render = |dir: &Path| {
        let t = ChatTemplate::from_model_dir(dir).unwrap().unwrap();
        t.render(&[ChatMessage::user("hi")], true).unwrap()
    };
    let tmp = template_dir("llava_tied");
    let d = tmp.path();
    let llava = "USER: hi ASSISTANT:";
    assert_eq!(render(d), llava);
    let t = ChatTemplate::from_model_dir(d).unwrap().unwrap();
    assert_eq!(t.bos_token(), Some("<s>"));
    assert_eq!(t.special_tokens()["eos_token"], "</s>");
    assert!(t.source().ends_with("chat_template.jinja"));
    // the processor's legacy chat_template.json wins over chat_template.jinja
    std::fs::write(
        d.join("chat_template.json"),
        r#"{"chat_template": "json {{ eos_token }}"}"#,
    )
    .unwrap();
    assert_eq!(render(d), "json </s>");
    // tokenizer_config.json's template, a list with a default
    std::fs::remove_file(d.join("chat_template.json")).unwrap();
    std::fs::remove_file(d.join("chat_template.jinja")).unwrap();
    assert!(ChatTemplate::from_model_dir(d).unwrap().is_none());
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("tokenizer_config.json")).unwrap())
            .unwrap();
    cfg["chat_template"] = serde_json::json!([
        {"name": "tool_use", "template": "tools"},
        {"name": "default", "template": "default {{ bos_token }}"}
    ]);
    std::fs::write(d.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    assert_eq!(render(d), "default <s>");
    cfg["chat_template"] = serde_json::json!([{"name": "tool_use", "template": "tools"}]);
    std::fs::write(d.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let e = ChatTemplate::from_model_dir(d).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer_config.json") && e.contains("default"),
        "{e}"
    );
    // llava_gqa: special tokens as {content} objects and named extra tokens
    let t = ChatTemplate::from_model_dir(&reference_dir().join("llava_gqa"))
        .unwrap()
        .unwrap();
    assert_eq!(t.special_tokens()["pad_token"], "<pad>");
    assert_eq!(t.special_tokens()["image_token"], "<image>");
    assert!(t.source().ends_with("chat_template.json"));
}

#[test]
fn a_template_with_a_syntax_error_names_its_file() {
    let tmp = template_dir("llava_tied");
    std::fs::write(
        tmp.path().join("chat_template.jinja"),
        "{% for m in messages %}{{ m.role }}",
    )
    .unwrap();
    match ChatTemplate::from_model_dir(tmp.path()) {
        Err(e @ Error::Config { .. }) => {
            let e = e.to_string();
            assert!(
                e.contains("chat_template.jinja") && e.contains("syntax error"),
                "{e}"
            );
        }
        other => panic!("expected a config error, got {other:?}"),
    }
    std::fs::write(
        tmp.path().join("chat_template.json"),
        r#"{"chat_template": 3}"#,
    )
    .unwrap();
    let e = ChatTemplate::from_model_dir(tmp.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("chat_template.json"), "{e}");
}
