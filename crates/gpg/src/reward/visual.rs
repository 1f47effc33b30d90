//! The rewards of the GPG reference's visual tasks (CV-Bench, GEOQA, few-shot classification,
//! LISA grounding).
//!
//! * `visual_accuracy`: 1 if the completion's answer is mathematically equal to the gold
//!   answer (mathverify); else 1 if the `<answer>…</answer>` contents (or the whole trimmed
//!   text when there is no such tag), compared exactly, are equal in completion and gold;
//!   else 1 if both name the same choice letter (`A`, `(B)`, `C.` at the start of the
//!   answer); else 0.
//! * `box_iou`: GIoU + 1 ∈ [0, 2] of the box in the completion against the gold box, boxes
//!   written `(x1,y1),(x2,y2)` or `[x1, y1, x2, y2]` (0–1000 coordinates, as Qwen2-VL writes
//!   them); 0 when the completion has no box. With I, U the intersection and union areas and
//!   C the area of the smallest box enclosing both: GIoU = I/U − (C − U)/C.
//!
//! The `<think>…</think><answer>…</answer>` format reward is the built-in `format`.

use std::sync::OnceLock;

use regex::Regex;

use super::accuracy::correctness;
use super::{require_answer, score_against_gold, Reward, RewardInput};

fn answer_tag() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"(?s)<answer>(.*?)</answer>")
            .unwrap_or_else(|e| panic!("constant regex is invalid: {e}"))
    })
}

/// The `<answer>` contents (trimmed), else the whole trimmed text.
pub fn answer_text(text: &str) -> &str {
    answer_tag()
        .captures(text)
        .and_then(|c| c.get(1))
        .map_or(text, |m| m.as_str())
        .trim()
}

/// The choice letter an answer starts with: `C`, `(C)`, `C.`, `C)`, `C:` or `C ` followed by
/// text; `None` otherwise.
pub fn choice_letter(answer: &str) -> Option<char> {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = RE.get_or_init(|| {
        Regex::new(r"\A\(?([A-Z])(?:\)|\.|:|\s|\z)")
            .unwrap_or_else(|e| panic!("constant regex is invalid: {e}"))
    });
    re.captures(answer.trim())
        .and_then(|c| c.get(1))
        .and_then(|m| m.as_str().chars().next())
}

/// The `visual_accuracy` score of one completion (see the module doc).
pub fn visual_accuracy(gold: &str, completion: &str) -> f32 {
    if correctness(gold, completion) > 0.0 {
        return 1.0;
    }
    let (g, c) = (answer_text(gold), answer_text(completion));
    if g == c {
        return 1.0;
    }
    match (choice_letter(g), choice_letter(c)) {
        (Some(a), Some(b)) if a == b => 1.0,
        _ => 0.0,
    }
}

/// `visual_accuracy` (see the module doc).
#[derive(Debug, Clone, Copy, Default)]
pub struct VisualAccuracyReward;

impl Reward for VisualAccuracyReward {
    fn name(&self) -> &str {
        "visual_accuracy"
    }

    fn score(&self, batch: &[RewardInput]) -> anyhow::Result<Vec<f32>> {
        score_against_gold(self.name(), batch, visual_accuracy)
    }
}

/// The first box in `text`: `(x1,y1),(x2,y2)` or `[x1, y1, x2, y2]` (numbers may have
/// decimals), as (x1, y1, x2, y2) with the corners ordered.
pub fn parse_box(text: &str) -> Option<[f64; 4]> {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = RE.get_or_init(|| {
        let n = r"(-?\d+(?:\.\d+)?)";
        Regex::new(&format!(
            r"\(\s*{n}\s*,\s*{n}\s*\)\s*,?\s*\(\s*{n}\s*,\s*{n}\s*\)|\[\s*{n}\s*,\s*{n}\s*,\s*{n}\s*,\s*{n}\s*\]"
        ))
        .unwrap_or_else(|e| panic!("constant regex is invalid: {e}"))
    });
    let c = re.captures(text)?;
    let nums: Vec<f64> = (1..=8)
        .filter_map(|i| c.get(i))
        .filter_map(|m| m.as_str().parse().ok())
        .collect();
    let [x1, y1, x2, y2]: [f64; 4] = nums.try_into().ok()?;
    Some([x1.min(x2), y1.min(y2), x1.max(x2), y1.max(y2)])
}

/// GIoU + 1 of two boxes (x1, y1, x2, y2), in [0, 2].
pub fn giou_plus_one(a: [f64; 4], b: [f64; 4]) -> f64 {
    let area = |r: [f64; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let union = area(a) + area(b) - inter;
    let enclosing = area([
        a[0].min(b[0]),
        a[1].min(b[1]),
        a[2].max(b[2]),
        a[3].max(b[3]),
    ]);
    if enclosing <= 0.0 {
        // Both boxes degenerate at one point: identical means a perfect match.
        return if a == b { 2.0 } else { 0.0 };
    }
    let iou = if union > 0.0 { inter / union } else { 0.0 };
    (iou - (enclosing - union) / enclosing + 1.0).clamp(0.0, 2.0)
}

/// `box_iou` (see the module doc).
#[derive(Debug, Clone, Copy, Default)]
pub struct BoxIouReward;

impl Reward for BoxIouReward {
    fn name(&self) -> &str {
        "box_iou"
    }

    fn score(&self, batch: &[RewardInput]) -> anyhow::Result<Vec<f32>> {
        batch
            .iter()
            .enumerate()
            .map(|(i, input)| {
                let gold = require_answer(self.name(), i, input)?;
                let g = parse_box(gold).ok_or_else(|| {
                    anyhow::anyhow!(
                        "reward `box_iou`: the gold answer of batch item {i} ({gold:?}) holds no box \
                         `(x1,y1),(x2,y2)` or `[x1, y1, x2, y2]`"
                    )
                })?;
                Ok(parse_box(answer_text(&input.completion))
                    .or_else(|| parse_box(&input.completion))
                    .map_or(0.0, |p| giou_plus_one(p, g) as f32))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(completion: &str, answer: &str) -> RewardInput {
        RewardInput {
            prompt: String::new(),
            completion: completion.into(),
            answer: Some(answer.into()),
            completion_tokens: 0,
            columns: Default::default(),
        }
    }

    #[test]
    fn accuracy_falls_back_from_math_to_exact_to_letter() {
        // Math equivalence.
        assert_eq!(
            visual_accuracy("0.5", "<think>…</think><answer>\\frac{1}{2}</answer>"),
            1.0
        );
        // Exact <answer> match of a non-math answer, tags on both sides.
        assert_eq!(
            visual_accuracy(
                "<answer>red circle</answer>",
                "<answer> red circle </answer>"
            ),
            1.0
        );
        // Choice letter.
        assert_eq!(
            visual_accuracy("(B)", "<answer>B. The chair is closer</answer>"),
            1.0
        );
        assert_eq!(visual_accuracy("C", "<answer>(C)</answer>"), 1.0);
        assert_eq!(visual_accuracy("(B)", "<answer>(C) left</answer>"), 0.0);
        assert_eq!(visual_accuracy("blue", "<answer>red</answer>"), 0.0);
        // A word starting with a capital is not a choice letter.
        assert_eq!(choice_letter("Blue"), None);
    }

    #[test]
    fn giou_hand_cases_and_box_parsing() {
        let a = [0.0, 0.0, 10.0, 10.0];
        assert_eq!(giou_plus_one(a, a), 2.0);
        // Half overlap: I = 50, U = 150, C = 150 → IoU = 1/3, GIoU = 1/3.
        let b = [5.0, 0.0, 15.0, 10.0];
        assert!((giou_plus_one(a, b) - (1.0 + 1.0 / 3.0)).abs() < 1e-12);
        // Disjoint far apart: GIoU → −1 + (U/C), here U = 200, C = 10·30 = 300.
        let c = [20.0, 0.0, 30.0, 10.0];
        assert!((giou_plus_one(a, c) - (1.0 - 1.0 / 3.0)).abs() < 1e-12);
        assert_eq!(
            parse_box("the box is (10,20),(300, 400)."),
            Some([10.0, 20.0, 300.0, 400.0])
        );
        assert_eq!(
            parse_box("[300, 400, 10, 20]"),
            Some([10.0, 20.0, 300.0, 400.0])
        );
        assert_eq!(parse_box("no box"), None);
        let r = BoxIouReward
            .score(&[
                input("<answer>(0,0),(10,10)</answer>", "[0, 0, 10, 10]"),
                input("I cannot tell", "[0, 0, 10, 10]"),
            ])
            .unwrap();
        assert_eq!(r, vec![2.0, 0.0]);
        let err = BoxIouReward
            .score(&[input("x", "none")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("box_iou") && err.contains("item 0"), "{err}");
    }
}
