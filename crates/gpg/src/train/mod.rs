//! The training loop and what it writes: metrics, TensorBoard events, checkpoints.

pub mod batch;
pub mod collective;
pub mod comm;
pub mod config;
pub mod device;
pub mod engine;
pub mod heldout;
pub mod lora_run;
pub mod metrics;
pub mod plot;
pub mod policy;
pub mod progress;
pub mod replica;
pub mod sft;
pub mod sft_config;
pub mod tensorboard;
pub mod trainer;

pub use config::TrainConfig;
pub use metrics::StepMetrics;
pub use trainer::Trainer;
