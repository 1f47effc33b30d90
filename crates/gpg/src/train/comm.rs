//! The run's collective with a clock: the time a step spends communicating is logged
//! (`time_comm_s`, of which `time_comm_grad_s` for the gradient all-reduce).

use std::cell::Cell;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;

use super::collective::Collective;
use super::engine::TrainEngine;

/// The collective with a clock of the time spent in it.
pub(crate) struct Comm {
    pub(crate) collective: Arc<dyn Collective>,
    seconds: Cell<f64>,
    /// Of which the gradient all-reduces.
    grad_seconds: Cell<f64>,
}

impl Comm {
    pub(crate) fn new(collective: Arc<dyn Collective>) -> Self {
        Self {
            collective,
            seconds: Cell::new(0.0),
            grad_seconds: Cell::new(0.0),
        }
    }

    /// Seconds spent in collective operations so far.
    pub(crate) fn seconds(&self) -> f64 {
        self.seconds.get()
    }

    /// Seconds spent in gradient all-reduces so far.
    pub(crate) fn grad_seconds(&self) -> f64 {
        self.grad_seconds.get()
    }

    pub(crate) fn add_seconds(&self, s: f64) {
        self.seconds.set(self.seconds.get() + s);
    }

    pub(crate) fn timed<R>(&self, f: impl FnOnce() -> Result<R>) -> Result<R> {
        let t0 = Instant::now();
        let out = f();
        self.add_seconds(t0.elapsed().as_secs_f64());
        out
    }

    pub(crate) fn all_reduce_f64(&self, data: &mut [f64]) -> Result<()> {
        if self.collective.world() == 1 {
            return Ok(());
        }
        self.timed(|| self.collective.all_reduce_sum_f64(data))
    }

    /// ⊕ Sums the engine's gradients over ranks: host buffers as one flat buffer (packed into
    /// chunks), or a GPU engine's device buffers (NCCL, or staged through the host), as the
    /// engine was set up (`TrainEngine::prepare_all_reduce`).
    pub(crate) fn all_reduce_grads(&self, engine: &mut dyn TrainEngine) -> Result<()> {
        if self.collective.world() == 1 {
            return Ok(());
        }
        let t0 = Instant::now();
        let out = self.timed(|| engine.all_reduce_gradients(&*self.collective));
        self.grad_seconds
            .set(self.grad_seconds.get() + t0.elapsed().as_secs_f64());
        out
    }
}
