//! The Qwen2-family decoder engine: config, weights, training forward/backward, decoding.

pub mod ops;
