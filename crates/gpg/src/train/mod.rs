//! The training loop and what it writes: metrics, TensorBoard events, checkpoints.

pub mod tensorboard;
