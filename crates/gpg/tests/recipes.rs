//! Every recipe shipped in recipes/ parses and validates.

use std::path::PathBuf;

use gpg::train::sft::SftConfig;
use gpg::train::TrainConfig;

#[test]
fn shipped_recipes_parse() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../recipes");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        if path.file_name().unwrap().to_str().unwrap().contains("sft") {
            SftConfig::from_toml_str(&text).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        } else {
            let c = TrainConfig::from_toml_file(&path).unwrap_or_else(|e| panic!("{e:#}"));
            assert!(c.steps > 0);
        }
        n += 1;
    }
    assert!(n >= 5, "found {n} recipes");
}
