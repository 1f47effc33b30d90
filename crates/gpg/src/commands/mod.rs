//! What the `gpg-rl` commands do, apart from parsing arguments and printing: shared by the
//! command line (crates/gpg-rl) and the Python package (crates/gpg-py), so that both run the
//! same code.
//!
//! * [`demo`]: the built-in demo (recipe and warm-start model, compiled in);
//! * [`train`]: a training run from a recipe, as `gpg-rl train` runs it;
//! * [`model_dir`]: loading a Hugging Face model directory for sampling or scoring;
//! * [`generate`], [`logprobs`], [`eval`]: `gpg-rl generate`, `logprobs` and `eval`.

pub mod demo;
pub mod eval;
pub mod generate;
pub mod logprobs;
pub mod model_dir;
pub mod train;
