//! The training loop and what it writes: metrics, TensorBoard events, checkpoints.

pub mod config;
pub mod metrics;
pub mod progress;
pub mod tensorboard;
pub mod trainer;

pub use config::TrainConfig;
pub use metrics::StepMetrics;
pub use trainer::Trainer;
