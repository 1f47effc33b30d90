//! Answer extraction and mathematical equivalence (see issue 3).

/// Whether `completion` (free model text) states an answer mathematically equal to `gold`.
///
/// Placeholder rule until the full verifier lands: the trimmed texts are equal.
pub fn is_correct(gold: &str, completion: &str) -> bool {
    gold.trim() == completion.trim()
}
