//! A weighted sum of reward functions: r_i = Σ_k w_k · r_k,i.

use anyhow::Context;

use super::{Reward, RewardInput};

/// Scores of one batch under a [`WeightedSum`].
#[derive(Debug, Clone, PartialEq)]
pub struct RewardScores {
    /// r_i = Σ_k w_k · r_k,i for each completion i.
    pub total: Vec<f32>,
    /// (name, unweighted scores r_k,i) for each function k, in the sum's order.
    pub per_function: Vec<(String, Vec<f32>)>,
}

impl RewardScores {
    /// (name, mean unweighted score) for each function; 0 for an empty batch.
    pub fn means(&self) -> Vec<(String, f32)> {
        self.per_function
            .iter()
            .map(|(name, scores)| (name.clone(), mean(scores)))
            .collect()
    }

    /// Mean of the total reward; 0 for an empty batch.
    pub fn total_mean(&self) -> f32 {
        mean(&self.total)
    }
}

fn mean(xs: &[f32]) -> f32 {
    if xs.is_empty() {
        0.0
    } else {
        (xs.iter().map(|&x| x as f64).sum::<f64>() / xs.len() as f64) as f32
    }
}

/// Reward functions with weights; scoring returns the weighted total and each part.
pub struct WeightedSum {
    terms: Vec<(Box<dyn Reward>, f32)>,
}

impl WeightedSum {
    /// A sum over `(reward, weight)` pairs; needs at least one term and finite weights.
    pub fn new(terms: Vec<(Box<dyn Reward>, f32)>) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !terms.is_empty(),
            "a reward sum needs at least one reward function"
        );
        for (reward, weight) in &terms {
            anyhow::ensure!(
                weight.is_finite(),
                "reward `{}` has weight {weight}; weights must be finite",
                reward.name()
            );
        }
        Ok(Self { terms })
    }

    /// Names of the functions, in order.
    pub fn names(&self) -> Vec<&str> {
        self.terms.iter().map(|(r, _)| r.name()).collect()
    }

    /// Weights of the functions, in order.
    pub fn weights(&self) -> Vec<f32> {
        self.terms.iter().map(|&(_, w)| w).collect()
    }

    /// Scores `batch` with every function and sums them with their weights.
    ///
    /// Errors if a function fails, returns the wrong number of scores, or a non-finite one.
    pub fn score_all(&self, batch: &[RewardInput]) -> anyhow::Result<RewardScores> {
        let mut total = vec![0.0f32; batch.len()];
        let mut per_function = Vec::with_capacity(self.terms.len());
        for (reward, weight) in &self.terms {
            let name = reward.name();
            let scores = reward
                .score(batch)
                .with_context(|| format!("reward function `{name}`"))?;
            anyhow::ensure!(
                scores.len() == batch.len(),
                "reward function `{name}` returned {} scores for a batch of {}",
                scores.len(),
                batch.len()
            );
            if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
                anyhow::bail!(
                    "reward function `{name}` returned {} for batch item {i}",
                    scores[i]
                );
            }
            for (t, s) in total.iter_mut().zip(&scores) {
                *t += weight * s;
            }
            per_function.push((name.to_string(), scores));
        }
        Ok(RewardScores {
            total,
            per_function,
        })
    }
}

impl Reward for WeightedSum {
    fn name(&self) -> &str {
        "weighted_sum"
    }

    fn score(&self, batch: &[RewardInput]) -> anyhow::Result<Vec<f32>> {
        Ok(self.score_all(batch)?.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scores each completion by its length in bytes.
    struct ByteLength;
    impl Reward for ByteLength {
        fn name(&self) -> &str {
            "bytes"
        }
        fn score(&self, batch: &[RewardInput]) -> anyhow::Result<Vec<f32>> {
            Ok(batch.iter().map(|b| b.completion.len() as f32).collect())
        }
    }

    /// Returns a fixed vector, whatever the batch.
    struct Fixed(Vec<f32>);
    impl Reward for Fixed {
        fn name(&self) -> &str {
            "fixed"
        }
        fn score(&self, _: &[RewardInput]) -> anyhow::Result<Vec<f32>> {
            Ok(self.0.clone())
        }
    }

    fn batch(completions: &[&str]) -> Vec<RewardInput> {
        completions
            .iter()
            .map(|c| RewardInput {
                prompt: String::new(),
                completion: c.to_string(),
                answer: None,
                completion_tokens: c.len(),
                columns: Default::default(),
            })
            .collect()
    }

    #[test]
    fn total_is_weighted_sum_of_parts() {
        let sum = WeightedSum::new(vec![
            (Box::new(ByteLength), 0.5),
            (Box::new(Fixed(vec![1.0, -2.0])), 2.0),
        ])
        .unwrap();
        let s = sum.score_all(&batch(&["abcd", "ab"])).unwrap();
        // item 0: 0.5·4 + 2·1 = 4; item 1: 0.5·2 + 2·(−2) = −3.
        assert_eq!(s.total, vec![4.0, -3.0]);
        assert_eq!(s.per_function[0], ("bytes".to_string(), vec![4.0, 2.0]));
        assert_eq!(s.per_function[1], ("fixed".to_string(), vec![1.0, -2.0]));
        assert_eq!(
            s.means(),
            vec![("bytes".to_string(), 3.0), ("fixed".to_string(), -0.5)]
        );
        assert_eq!(s.total_mean(), 0.5);
        assert_eq!(sum.names(), vec!["bytes", "fixed"]);
        assert_eq!(sum.weights(), vec![0.5, 2.0]);
    }

    #[test]
    fn wrong_length_or_non_finite_scores_are_errors() {
        let sum = WeightedSum::new(vec![(Box::new(Fixed(vec![1.0])), 1.0)]).unwrap();
        let err = sum.score_all(&batch(&["a", "b"])).unwrap_err().to_string();
        assert!(err.contains("fixed") && err.contains("1 scores"), "{err}");
        let sum = WeightedSum::new(vec![(Box::new(Fixed(vec![1.0, f32::NAN])), 1.0)]).unwrap();
        let err = sum.score_all(&batch(&["a", "b"])).unwrap_err().to_string();
        assert!(err.contains("batch item 1"), "{err}");
    }

    #[test]
    fn empty_or_non_finite_weights_are_rejected() {
        assert!(WeightedSum::new(vec![]).is_err());
        assert!(WeightedSum::new(vec![(Box::new(ByteLength), f32::INFINITY)]).is_err());
    }
}
