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
