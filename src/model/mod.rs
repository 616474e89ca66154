//! Model definitions and everything needed to load them: config, weights, tokenizer, template, image.

pub mod config;
pub mod image;
