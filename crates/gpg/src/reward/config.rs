//! Reward configuration: which functions, with which weights and options.
//!
//! In JSON (TOML is the same shape):
//!
//! ```json
//! {"functions": [
//!   {"name": "accuracy", "weight": 1.0},
//!   {"name": "cosine", "weight": 0.5, "options": {"max_len": 256}},
//!   {"name": "external", "options": {"command": ["python3", "score.py"], "timeout_secs": 30}},
//!   {"name": "in_process", "options": {"key": "my_reward"}}
//! ]}
//! ```

use anyhow::Context;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{
    AccuracyReward, BoxedFormatReward, CosineLengthReward, CosineOptions, ExactMatchReward,
    ExternalOptions, ExternalReward, InProcessOptions, LengthOptions, LengthReward, Reward,
    ThinkAnswerFormatReward, WeightedSum,
};

/// Names accepted in [`RewardSpec::name`].
pub const REWARD_NAMES: [&str; 10] = [
    "accuracy",
    "format",
    "boxed_format",
    "cosine",
    "exact_match",
    "length",
    "external",
    "visual_accuracy",
    "box_iou",
    "in_process",
];

/// The reward functions of a run; the reward is their weighted sum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardConfig {
    pub functions: Vec<RewardSpec>,
}

impl Default for RewardConfig {
    /// Accuracy alone, weight 1 (the GPG paper's recipe).
    fn default() -> Self {
        Self {
            functions: vec![RewardSpec {
                name: "accuracy".into(),
                weight: 1.0,
                options: None,
            }],
        }
    }
}

/// One reward function: its name (one of [`REWARD_NAMES`]), weight and options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardSpec {
    pub name: String,
    #[serde(default = "default_weight")]
    pub weight: f32,
    /// Function-specific options (`cosine`: [`CosineOptions`]; `length`: [`LengthOptions`];
    /// `external`: [`ExternalOptions`], required; `in_process`: [`InProcessOptions`], required).
    /// Other functions take none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<serde_json::Value>,
}

fn default_weight() -> f32 {
    1.0
}

impl RewardSpec {
    /// Builds the reward function this spec names.
    pub fn build(&self) -> anyhow::Result<Box<dyn Reward>> {
        let name = self.name.as_str();
        let reward: Box<dyn Reward> = match name {
            "accuracy" => {
                self.no_options()?;
                Box::new(AccuracyReward)
            }
            "format" => {
                self.no_options()?;
                Box::new(ThinkAnswerFormatReward::new())
            }
            "boxed_format" => {
                self.no_options()?;
                Box::new(BoxedFormatReward)
            }
            "exact_match" => {
                self.no_options()?;
                Box::new(ExactMatchReward)
            }
            "visual_accuracy" => {
                self.no_options()?;
                Box::new(super::VisualAccuracyReward)
            }
            "box_iou" => {
                self.no_options()?;
                Box::new(super::BoxIouReward)
            }
            "cosine" => {
                let options: CosineOptions = self.parse_options()?.unwrap_or_default();
                Box::new(CosineLengthReward::new(options)?)
            }
            "length" => {
                let options: LengthOptions = self.parse_options()?.unwrap_or_default();
                Box::new(LengthReward { options })
            }
            "external" => {
                let options: ExternalOptions = self.parse_options()?.with_context(|| {
                    "reward `external` needs options {\"command\": [program, args...]}"
                })?;
                Box::new(ExternalReward::from_options(&options)?)
            }
            "in_process" => {
                let options: InProcessOptions = self.parse_options()?.with_context(|| {
                    "reward `in_process` needs options {\"key\": name it was registered under}"
                })?;
                super::in_process::lookup(&options.key)?
            }
            other => anyhow::bail!(
                "unknown reward function `{other}`; valid names: {}",
                REWARD_NAMES.join(", ")
            ),
        };
        Ok(reward)
    }

    fn no_options(&self) -> anyhow::Result<()> {
        match &self.options {
            None => Ok(()),
            Some(serde_json::Value::Object(map)) if map.is_empty() => Ok(()),
            Some(v) => anyhow::bail!("reward `{}` takes no options, got {v}", self.name),
        }
    }

    fn parse_options<T: DeserializeOwned>(&self) -> anyhow::Result<Option<T>> {
        self.options
            .clone()
            .map(serde_json::from_value)
            .transpose()
            .with_context(|| format!("options of reward `{}`", self.name))
    }
}

impl RewardConfig {
    /// Builds the weighted sum of the configured functions.
    pub fn build(&self) -> anyhow::Result<WeightedSum> {
        let terms = self
            .functions
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let reward = spec
                    .build()
                    .with_context(|| format!("reward config: functions[{i}]"))?;
                Ok((reward, spec.weight))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        WeightedSum::new(terms).context("reward config")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reward::RewardInput;

    fn parse(json: &str) -> anyhow::Result<RewardConfig> {
        Ok(serde_json::from_str(json)?)
    }

    #[test]
    fn builds_weighted_sum_from_json() {
        let config = parse(
            r#"{"functions": [
                {"name": "exact_match", "weight": 2.0},
                {"name": "boxed_format"},
                {"name": "cosine", "weight": 0.5, "options": {"max_len": 10}}
            ]}"#,
        )
        .unwrap();
        let sum = config.build().unwrap();
        assert_eq!(sum.names(), vec!["exact_match", "boxed_format", "cosine"]);
        assert_eq!(sum.weights(), vec![2.0, 1.0, 0.5]);
        let input = RewardInput {
            prompt: String::new(),
            completion: "\\boxed{3}".into(),
            answer: Some("\\boxed{3}".into()),
            completion_tokens: 5,
            columns: Default::default(),
        };
        let correct = mathverify::is_correct("\\boxed{3}", "\\boxed{3}");
        assert!(correct);
        // 2·1 + 1·1 + 0.5·0.75 (correct at half of max_len).
        let s = sum.score_all(&[input]).unwrap();
        assert!((s.total[0] - 3.375).abs() < 1e-6, "{:?}", s);
    }

    #[test]
    fn unknown_name_lists_valid_ones() {
        let config = parse(r#"{"functions": [{"name": "acuracy"}]}"#).unwrap();
        let err = format!("{:#}", config.build().err().unwrap());
        assert!(
            err.contains("functions[0]") && err.contains("acuracy"),
            "{err}"
        );
        for name in REWARD_NAMES {
            assert!(err.contains(name), "{err}");
        }
    }

    #[test]
    fn unknown_fields_and_options_are_rejected() {
        assert!(parse(r#"{"functions": [{"name": "accuracy", "wieght": 1}]}"#).is_err());
        assert!(parse(r#"{"functions": [], "extra": 1}"#).is_err());
        let c = parse(r#"{"functions": [{"name": "cosine", "options": {"maxlen": 5}}]}"#).unwrap();
        let err = format!("{:#}", c.build().err().unwrap());
        assert!(err.contains("maxlen") && err.contains("cosine"), "{err}");
        let c = parse(r#"{"functions": [{"name": "accuracy", "options": {"x": 1}}]}"#).unwrap();
        assert!(c.build().is_err());
        let c = parse(r#"{"functions": [{"name": "external"}]}"#).unwrap();
        assert!(format!("{:#}", c.build().err().unwrap()).contains("command"));
        assert!(parse(r#"{"functions": []}"#).unwrap().build().is_err());
    }

    #[test]
    fn default_is_accuracy_alone() {
        let sum = RewardConfig::default().build().unwrap();
        assert_eq!(sum.names(), vec!["accuracy"]);
        assert_eq!(sum.weights(), vec![1.0]);
    }

    #[cfg(unix)]
    #[test]
    fn external_from_config() {
        let c = parse(
            r#"{"functions": [{"name": "external", "weight": 3,
                "options": {"command": ["sh", "-c", "while read -r l; do echo 0.25; done"],
                            "timeout_secs": 10, "name": "quarter"}}]}"#,
        )
        .unwrap();
        let sum = c.build().unwrap();
        let input = RewardInput {
            prompt: "q".into(),
            completion: "c".into(),
            answer: None,
            completion_tokens: 1,
            columns: Default::default(),
        };
        let s = sum.score_all(&[input.clone(), input]).unwrap();
        assert_eq!(s.total, vec![0.75, 0.75]);
        assert_eq!(s.per_function[0].0, "quarter");
    }
}
