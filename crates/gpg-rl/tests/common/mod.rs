//! Helpers shared by the CLI tests (each test binary uses a subset of them).
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// The `gpg-rl` binary under test.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gpg-rl"))
}

/// Runs `gpg-rl args…` to completion.
pub fn gpg_rl(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

/// Asserts that the command succeeded (showing its stderr otherwise).
pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "gpg-rl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts success and returns stdout.
pub fn ok_stdout(out: &Output) -> String {
    assert_ok(out);
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Asserts that the command failed and returns its stderr.
pub fn failed_stderr(out: &Output) -> String {
    assert!(!out.status.success(), "gpg-rl unexpectedly succeeded");
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// The JSON objects of a JSONL text (blank lines skipped).
pub fn parse_jsonl(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The JSON objects of a JSONL file.
pub fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    parse_jsonl(&std::fs::read_to_string(path).unwrap())
}
