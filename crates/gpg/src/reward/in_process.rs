//! Rewards supplied in-process by the program that runs the trainer (the Python package's
//! reward functions), named in a recipe by a key.
//!
//! The program registers a [`Reward`] under a key for as long as the returned
//! [`Registration`] lives, and names it in the recipe:
//!
//! ```toml
//! [[reward.functions]]
//! name = "in_process"
//! options = { key = "my_reward" }
//! ```
//!
//! [`RewardSpec::build`](super::RewardSpec::build) then looks the key up in this process-wide
//! registry. The trainer sees an ordinary [`Reward`]; a recipe naming a key that nothing
//! registered (e.g. such a run's config.toml given to the `gpg-rl` command line) is refused
//! with the reason.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::{Reward, RewardInput};

/// Options of an `in_process` reward as written in a reward config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InProcessOptions {
    /// The key the reward was registered under ([`register`]).
    pub key: String,
}

type Registry = BTreeMap<String, Arc<dyn Reward>>;

static REGISTRY: Mutex<Registry> = Mutex::new(BTreeMap::new());

fn registry() -> MutexGuard<'static, Registry> {
    // A panic while the lock was held cannot leave the map half-updated (single inserts and
    // removes), so a poisoned lock is still usable.
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeps a reward registered; dropping it removes the key.
#[derive(Debug)]
#[must_use = "the reward is unregistered when the Registration is dropped"]
pub struct Registration {
    key: String,
}

impl Registration {
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        registry().remove(&self.key);
    }
}

/// Registers `reward` under `key` until the returned [`Registration`] is dropped. Errors if
/// the key is empty or already registered (by a run still in progress in this process).
pub fn register(key: &str, reward: Arc<dyn Reward>) -> anyhow::Result<Registration> {
    anyhow::ensure!(
        !key.is_empty(),
        "an in-process reward needs a non-empty key"
    );
    let mut map = registry();
    anyhow::ensure!(
        !map.contains_key(key),
        "an in-process reward is already registered under `{key}` (by another run in this \
         process); give this one another name"
    );
    map.insert(key.to_string(), reward);
    Ok(Registration {
        key: key.to_string(),
    })
}

/// The reward registered under `key`, as a [`Reward`] that delegates to it.
pub fn lookup(key: &str) -> anyhow::Result<Box<dyn Reward>> {
    let found = registry().get(key).cloned();
    match found {
        Some(reward) => Ok(Box::new(Shared(reward))),
        None => anyhow::bail!(
            "no in-process reward is registered under `{key}`: `in_process` rewards are \
             functions handed to the trainer by the program that runs it (in Python: \
             gpg_rl.train(..., reward_funcs=[...])), so this recipe runs only from there; from \
             the command line, replace it with a built-in reward or an `external` command"
        ),
    }
}

/// A registered reward, shared with the registry.
struct Shared(Arc<dyn Reward>);

impl Reward for Shared {
    fn name(&self) -> &str {
        self.0.name()
    }

    fn score(&self, batch: &[RewardInput]) -> anyhow::Result<Vec<f32>> {
        self.0.score(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reward::RewardConfig;

    struct PromptLength;
    impl Reward for PromptLength {
        fn name(&self) -> &str {
            "prompt_length"
        }
        fn score(&self, batch: &[RewardInput]) -> anyhow::Result<Vec<f32>> {
            Ok(batch.iter().map(|b| b.prompt.len() as f32).collect())
        }
    }

    fn config(key: &str) -> RewardConfig {
        serde_json::from_value(serde_json::json!({"functions": [
            {"name": "in_process", "weight": 2.0, "options": {"key": key}}
        ]}))
        .unwrap()
    }

    #[test]
    fn a_registered_reward_is_built_from_its_key_until_unregistered() {
        let registration =
            register("test-prompt-length", Arc::new(PromptLength)).expect("register");
        assert_eq!(registration.key(), "test-prompt-length");
        let sum = config("test-prompt-length").build().unwrap();
        assert_eq!(sum.names(), vec!["prompt_length"]);
        let input = RewardInput {
            prompt: "abc".into(),
            completion: String::new(),
            answer: None,
            completion_tokens: 0,
            columns: Default::default(),
        };
        assert_eq!(sum.score_all(&[input]).unwrap().total, vec![6.0]);
        let twice = register("test-prompt-length", Arc::new(PromptLength)).unwrap_err();
        assert!(twice.to_string().contains("already registered"), "{twice}");
        drop(registration);
        let err = format!("{:#}", config("test-prompt-length").build().err().unwrap());
        assert!(
            err.contains("test-prompt-length") && err.contains("reward_funcs"),
            "{err}"
        );
    }

    #[test]
    fn options_are_checked() {
        let c: RewardConfig =
            serde_json::from_value(serde_json::json!({"functions": [{"name": "in_process"}]}))
                .unwrap();
        assert!(format!("{:#}", c.build().err().unwrap()).contains("key"));
        let c: RewardConfig = serde_json::from_value(serde_json::json!({"functions": [
            {"name": "in_process", "options": {"key": "k", "extra": 1}}
        ]}))
        .unwrap();
        assert!(format!("{:#}", c.build().err().unwrap()).contains("extra"));
        assert!(register("", Arc::new(PromptLength)).is_err());
    }
}
