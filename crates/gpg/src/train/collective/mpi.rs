//! The collective over MPI (cargo feature `mpi`, rsmpi): one rank per process, started by
//! `mpirun -np N gpg-rl train …` or `srun gpg-rl train …`.
//!
//! Failure behaviour:
//! * an MPI error (a peer's connection lost, …) goes to MPI_COMM_WORLD's default error handler,
//!   `MPI_ERRORS_ARE_FATAL`: the job is aborted, no rank hangs;
//! * a rank that exits (an error, SIGKILL, a crash) makes the launcher end the others (OpenMPI's
//!   mpirun / prterun: "one or more processes exited with non-zero status ... the job has been
//!   aborted"; srun: `--kill-on-bad-exit`, see examples/slurm/train.sbatch);
//! * a rank whose own error is caught by gpg-rl calls [`Collective::abort`] (MPI_Abort), ending
//!   every process at once;
//! * a watchdog thread ends this process (exit status 70) when one collective operation has
//!   waited longer than the timeout for the other ranks (a rank stuck outside MPI), which then
//!   ends the job as above.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::Threading;

use super::{Collective, CHUNK_ELEMS};

/// Bytes per message of a large broadcast (MPI counts are 32-bit).
const BYTES_CHUNK: usize = 1 << 30;

struct Comm {
    world: SimpleCommunicator,
    _universe: mpi::environment::Universe,
}

// SAFETY: MPI is initialised with at least `Threading::Serialized` (checked in `init`) and every
// call on the communicator goes through the `Mutex` in `MpiCollective`, so calls are never
// concurrent, which is what the Serialized level requires.
unsafe impl Send for Comm {}
unsafe impl Sync for Comm {}

/// MPI_COMM_WORLD as a [`Collective`].
pub struct MpiCollective {
    comm: Mutex<Comm>,
    rank: usize,
    world: usize,
    /// Milliseconds since `epoch` at which the current operation started (0: none running).
    entered_ms: Arc<AtomicU64>,
}

impl MpiCollective {
    /// Initialises MPI (once per process) and starts the watchdog: an operation that waits
    /// longer than `timeout` for the other ranks ends this process.
    pub fn init(timeout: Duration) -> Result<Self> {
        let Some((universe, provided)) = mpi::initialize_with_threading(Threading::Serialized)
        else {
            bail!("MPI was already initialised in this process");
        };
        if provided < Threading::Serialized {
            bail!(
                "the MPI library offers thread level {provided:?}; gpg-rl needs Serialized (its \
                 watchdog and compute threads coexist with MPI calls)"
            );
        }
        let world = universe.world();
        let rank = world.rank() as usize;
        let size = world.size() as usize;
        let entered_ms = Arc::new(AtomicU64::new(0));
        let epoch = *EPOCH.get_or_init(Instant::now);
        {
            let entered_ms = entered_ms.clone();
            std::thread::Builder::new()
                .name("gpg-rl-mpi-watchdog".into())
                .spawn(move || loop {
                    std::thread::sleep(Duration::from_millis(500));
                    let since = entered_ms.load(Ordering::SeqCst);
                    if since == 0 {
                        continue;
                    }
                    let now = epoch.elapsed().as_millis() as u64;
                    if now.saturating_sub(since) > timeout.as_millis() as u64 {
                        eprintln!(
                            "error: rank {rank}: a collective operation has waited {:.0} s for \
                             the other ranks (distributed.timeout_s = {:.0}); a rank is stuck or \
                             gone: ending this process so that the launcher ends the job",
                            (now - since) as f64 / 1000.0,
                            timeout.as_secs_f64()
                        );
                        // SAFETY: _exit ends the process at once, without running handlers that
                        // could wait on the blocked MPI call.
                        unsafe { libc::_exit(70) };
                    }
                })?;
        }
        Ok(Self {
            comm: Mutex::new(Comm {
                world,
                _universe: universe,
            }),
            rank,
            world: size,
            entered_ms,
        })
    }

    /// Runs `f` on the communicator, timed by the watchdog.
    fn with_comm<R>(&self, f: impl FnOnce(&SimpleCommunicator) -> R) -> Result<R> {
        let comm = self
            .comm
            .lock()
            .map_err(|_| anyhow::anyhow!("MPI: a thread panicked during a collective"))?;
        // +1 so that an operation entered at time 0 is not read as "none".
        let start = EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1;
        self.entered_ms.store(start, Ordering::SeqCst);
        let out = f(&comm.world);
        self.entered_ms.store(0, Ordering::SeqCst);
        Ok(out)
    }
}

static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

impl Collective for MpiCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn backend(&self) -> &'static str {
        "mpi"
    }
    fn all_reduce_sum_f32(&self, data: &mut [f32]) -> Result<()> {
        for chunk in data.chunks_mut(CHUNK_ELEMS) {
            let send = chunk.to_vec();
            self.with_comm(|c| c.all_reduce_into(&send[..], chunk, SystemOperation::sum()))?;
        }
        Ok(())
    }
    fn all_reduce_sum_f64(&self, data: &mut [f64]) -> Result<()> {
        for chunk in data.chunks_mut(CHUNK_ELEMS) {
            let send = chunk.to_vec();
            self.with_comm(|c| c.all_reduce_into(&send[..], chunk, SystemOperation::sum()))?;
        }
        Ok(())
    }
    fn all_reduce_sum_u64(&self, data: &mut [u64]) -> Result<()> {
        for chunk in data.chunks_mut(CHUNK_ELEMS) {
            let send = chunk.to_vec();
            self.with_comm(|c| c.all_reduce_into(&send[..], chunk, SystemOperation::sum()))?;
        }
        Ok(())
    }
    fn broadcast_bytes(&self, data: &mut Vec<u8>, root: usize) -> Result<()> {
        if root >= self.world {
            bail!("broadcast from rank {root} in a world of {}", self.world);
        }
        let mut len = [data.len() as u64];
        self.with_comm(|c| c.process_at_rank(root as i32).broadcast_into(&mut len[..]))?;
        if self.rank != root {
            data.clear();
            data.resize(len[0] as usize, 0);
        }
        for chunk in data.chunks_mut(BYTES_CHUNK) {
            self.with_comm(|c| c.process_at_rank(root as i32).broadcast_into(chunk))?;
        }
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.with_comm(|c| c.barrier())
    }
    fn abort(&self, reason: &str) {
        eprintln!("error: rank {}: {reason}; aborting all ranks", self.rank);
        // Do not wait for the lock: another thread may be blocked in a collective.
        let world = SimpleCommunicator::world();
        world.abort(1)
    }
}
