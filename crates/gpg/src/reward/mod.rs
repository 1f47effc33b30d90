//! Rewards: a `Reward` trait and the built-in reward functions.
