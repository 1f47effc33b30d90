//! Optimiser (AdamW), global-norm gradient clipping, learning-rate schedules.
//!
//! * [`adamw`]: `torch.optim.AdamW` over named flat f32 buffers, with exactly restorable state;
//! * [`clip`]: `torch.nn.utils.clip_grad_norm_` over a list of gradient buffers, reporting a
//!   non-finite norm instead of scaling by it;
//! * [`master`]: the f32 master of a bf16 parameter kept as its lower 16 bits beside the
//!   bf16 tensor (exactly the f32 master, half its memory);
//! * [`schedule`]: the `transformers` schedules (constant, constant with warm-up, linear,
//!   cosine with a floor), `lr_at(step)` for the 0-based optimiser step.
//!
//! One optimiser step, as the trainer uses this module:
//!
//! ```text
//! let clip = clip_grad_norm(&mut grads, max_norm);      // skip the step if !clip.finite
//! optimiser.step(schedule.lr_at(step), params_and_grads)?;
//! ```

pub mod adamw;
pub mod clip;
pub mod master;
pub mod schedule;

pub use adamw::{AdamW, AdamWConfig, AdamWState, ParamGrad, ParamState, StepScalars};
pub use clip::{clip_grad_norm, clip_scale, global_grad_norm, GradClip};
pub use master::SplitMaster;
pub use schedule::{warmup_steps_for_ratio, LrSchedule, LrScheduleConfig, LrScheduleKind};
