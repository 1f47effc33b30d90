//! One module per subcommand.

pub mod bench;
mod bench_cuda;
mod bench_products;
mod bench_trainer;
pub mod eval;
pub mod generate;
pub mod init;
pub mod logprobs;
pub mod math_verify;
pub mod merge;
mod model_dir;
pub mod sft;
pub mod train;
