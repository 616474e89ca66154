//! `fineprune serve` on the bundled model, driven over HTTP by the real `openai` Python client
//! (tests/serve/openai_client.py): an answer equal to `fineprune generate`'s, streaming, 8
//! concurrent requests with different prune plans equal to each alone, a client disconnecting
//! mid-stream, bad requests answered 400 while the server keeps serving.
//!
//! The client needs a Python with `openai`: `FINEPRUNE_SERVE_PYTHON`, else
//! `target/serve-venv/bin/python` (`.ci/run` makes it). Without one the test says it skipped
//! (under `CI` it fails).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A Python that can `import openai`, or None (skipped).
fn python() -> Option<PathBuf> {
    let p = std::env::var_os("FINEPRUNE_SERVE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/serve-venv/bin/python"));
    let ok = Command::new(&p)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(p);
    }
    if std::env::var_os("CI").is_some() {
        panic!("CI is set but {} cannot import openai", p.display());
    }
    println!(
        "skipped: {} cannot import openai (set FINEPRUNE_SERVE_PYTHON)",
        p.display()
    );
    None
}

/// Kills the server when the test ends, passed or not.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_openai_client_gets_answers_streams_cancels_and_clear_errors() {
    let Some(python) = python() else { return };
    let bin = env!("CARGO_BIN_EXE_fineprune");
    let model = root().join("models/shapes-llava");
    let image = model.join("example.png");
    let question =
        "What shape is the purple object? Answer the question using a single word or phrase.";
    let max_tokens = 24;
    // The reference answer: `fineprune generate`, greedy.
    let out = Command::new(bin)
        .args(["generate", "--model"])
        .arg(&model)
        .arg("--image")
        .arg(&image)
        .args([
            "--prompt",
            question,
            "--max-new-tokens",
            &max_tokens.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let expected = tmp.path().join("expected.json");
    std::fs::write(
        &expected,
        serde_json::json!({"question": question, "text": text, "max_tokens": max_tokens})
            .to_string(),
    )
    .unwrap();

    let mut child = Command::new(bin)
        .args(["serve", "--port", "0", "--model"])
        .arg(&model)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let server = Server(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let url = line
        .split("http://")
        .nth(1)
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .trim()
        .to_string();
    let run = Command::new(&python)
        .arg(root().join("tests/serve/openai_client.py"))
        .arg(format!("http://{url}/v1"))
        .arg("shapes-llava")
        .arg(&image)
        .arg(&expected)
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    println!("{log}");
    drop(server);
    assert!(
        run.status.success() && log.contains("ALL OK"),
        "the openai client checks failed:\n{log}"
    );
}
