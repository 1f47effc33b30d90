//! The collective seam of data-parallel training: rank, world size, all-reduce (sum) of
//! f32 / f64 / u64 slices, broadcast of bytes, barrier.
//!
//! Implementations:
//!
//! * [`SingleProcess`] (the default): world 1, every operation is the identity;
//! * [`ThreadGroup`]: N ranks as threads of one process (tests; the reduction sums the ranks'
//!   contributions in rank order, so every rank gets bit-identical results);
//! * `Mpi` (cargo feature `mpi`): one rank per process started by `mpirun` / `srun`
//!   ([`mpi::MpiCollective`]).
//! * `Nccl` (feature `cuda`, [`nccl::NcclCollective`]): one rank per process and GPU, over a
//!   host collective (MPI) that gives the rank, the world and carries NCCL's unique id; the
//!   host operations of the trait (loss sums, broadcasts, barrier) stay on the host
//!   collective, and the CUDA engine's gradients are summed in place on the device, in
//!   buckets ([`BucketPlan`]). Which transport sums the gradients is chosen by
//!   [`GradReduce::select`] from `[distributed] backend` (docs/training.md).
//!
//! # Contract
//!
//! Every rank calls the same operations in the same order with slices of the same length (a
//! mismatch is a bug; the thread group detects it and errors). After
//! `all_reduce_sum_*(x)`, every rank holds x₀ + x₁ + … + x_{N−1} elementwise; after
//! `broadcast_bytes(buf, root)` every rank holds root's bytes. An operation that cannot
//! complete — a rank died or left, or nothing arrived within the group's timeout — returns an
//! error naming the rank and the operation, never hangs forever.
//!
//! Large buffers go through in chunks of [`CHUNK_ELEMS`] elements (bounded staging memory; MPI
//! counts are 32-bit).

mod buckets;
mod threads;

#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "cuda")]
pub mod nccl;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

pub use buckets::{BucketPlan, BUCKET_BYTES};
pub use threads::{ThreadGroup, ThreadMember};

/// Elements per chunk of a large all-reduce (16 Mi elements: 64 MB of f32).
pub const CHUNK_ELEMS: usize = 1 << 24;

/// The collective operations of one rank (see the module docs for the contract).
pub trait Collective: Send + Sync {
    /// This process's rank, 0 ≤ rank < world.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world(&self) -> usize;
    /// What carries the messages (`single`, `threads`, `mpi`), for logs.
    fn backend(&self) -> &'static str;
    /// Elementwise sum over ranks, in place.
    fn all_reduce_sum_f32(&self, data: &mut [f32]) -> Result<()>;
    /// Elementwise sum over ranks, in place.
    fn all_reduce_sum_f64(&self, data: &mut [f64]) -> Result<()>;
    /// Elementwise sum over ranks, in place.
    fn all_reduce_sum_u64(&self, data: &mut [u64]) -> Result<()>;
    /// Replaces `data` on every rank by `root`'s bytes (any length: non-root ranks learn it).
    fn broadcast_bytes(&self, data: &mut Vec<u8>, root: usize) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// Ends the whole job after an unrecoverable error on this rank, so the other ranks do
    /// not wait for it: MPI aborts every process; the thread group fails the other members'
    /// pending and later operations with `reason`.
    fn abort(&self, reason: &str);
}

impl dyn Collective + '_ {
    /// Whether this rank owns the run folder (rank 0).
    pub fn is_root(&self) -> bool {
        self.rank() == 0
    }

    /// The contiguous share `[start, end)` of `n` items that this rank takes: the first
    /// `n mod world` ranks take one more than the others (so shares differ by at most one).
    pub fn share(&self, n: usize) -> std::ops::Range<usize> {
        share(n, self.rank(), self.world())
    }

    /// Sums a set of f32 slices over ranks as if they were one flat buffer: consecutive
    /// slices are packed into staging chunks of at most [`CHUNK_ELEMS`] elements, so a
    /// gradient tree of many tensors costs few messages. A no-op at world 1.
    pub fn all_reduce_sum_slices(&self, slices: &mut [&mut [f32]]) -> Result<()> {
        if self.world() == 1 {
            return Ok(());
        }
        let mut staging: Vec<f32> = Vec::new();
        let mut pending: Vec<usize> = Vec::new(); // indices of slices packed into `staging`
        let flush = |staging: &mut Vec<f32>,
                     pending: &mut Vec<usize>,
                     slices: &mut [&mut [f32]]|
         -> Result<()> {
            if pending.is_empty() {
                return Ok(());
            }
            self.all_reduce_sum_f32(staging)?;
            let mut off = 0;
            for &i in pending.iter() {
                let n = slices[i].len();
                slices[i].copy_from_slice(&staging[off..off + n]);
                off += n;
            }
            staging.clear();
            pending.clear();
            Ok(())
        };
        for i in 0..slices.len() {
            let n = slices[i].len();
            if n >= CHUNK_ELEMS {
                flush(&mut staging, &mut pending, slices)?;
                for chunk in slices[i].chunks_mut(CHUNK_ELEMS) {
                    self.all_reduce_sum_f32(chunk)?;
                }
                continue;
            }
            if staging.len() + n > CHUNK_ELEMS {
                flush(&mut staging, &mut pending, slices)?;
            }
            staging.extend_from_slice(slices[i]);
            pending.push(i);
        }
        flush(&mut staging, &mut pending, slices)
    }

    /// Collects every rank's bytes, in rank order (one broadcast per rank; for small
    /// payloads such as logged completions).
    pub fn gather_bytes(&self, mine: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        let mut all = Vec::with_capacity(self.world());
        for root in 0..self.world() {
            let mut buf = if root == self.rank() {
                mine.clone()
            } else {
                Vec::new()
            };
            self.broadcast_bytes(&mut buf, root)?;
            all.push(buf);
        }
        Ok(all)
    }

    /// Errors on every rank unless `value` is the same on all of them; `what` names it.
    /// (Rank 0 broadcasts its value; the number of ranks that differ is summed, so all ranks
    /// agree on the verdict and fail together.)
    pub fn ensure_same(&self, value: &[u8], what: &str) -> Result<()> {
        if self.world() == 1 {
            return Ok(());
        }
        let mut root = value.to_vec();
        self.broadcast_bytes(&mut root, 0)?;
        let mut differ = [u64::from(root != value)];
        self.all_reduce_sum_u64(&mut differ)?;
        if differ[0] > 0 {
            bail!(
                "{what} differs between ranks: {} of {} ranks disagree with rank 0{}",
                differ[0],
                self.world(),
                if root != value {
                    format!(" (this rank {} is one of them)", self.rank())
                } else {
                    String::new()
                }
            );
        }
        Ok(())
    }
}

/// The contiguous share `[start, end)` of `n` items for `rank` of `world` (see
/// [`Collective::share`]).
pub fn share(n: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    let base = n / world;
    let extra = n % world;
    let start = rank * base + rank.min(extra);
    let len = base + usize::from(rank < extra);
    start..start + len
}

/// World 1: every operation is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn backend(&self) -> &'static str {
        "single"
    }
    fn all_reduce_sum_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_u64(&self, _: &mut [u64]) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&self, _: &mut Vec<u8>, root: usize) -> Result<()> {
        if root != 0 {
            bail!("broadcast from rank {root} in a world of 1");
        }
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, _: &str) {}
}

/// What sums the gradients of a data-parallel run (`[distributed] backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GradBackend {
    /// NCCL when the run trains on a GPU, the host collective on the CPU.
    #[default]
    Auto,
    /// NCCL on the device's gradient buffers (a GPU run only).
    Nccl,
    /// The host collective (MPI): a GPU run downloads its gradients, sums them on the host and
    /// uploads the sums (slower; for a machine without NCCL).
    Host,
}

impl std::fmt::Display for GradBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GradBackend::Auto => "auto",
            GradBackend::Nccl => "nccl",
            GradBackend::Host => "host",
        })
    }
}

/// How this run sums its gradients over ranks ([`GradReduce::select`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GradReduce {
    /// World 1: nothing to sum.
    Single,
    /// The host collective, on host buffers (a GPU run stages through host memory).
    Host,
    /// NCCL, on the device buffers of a GPU run.
    Nccl,
}

impl GradReduce {
    /// The choice for `backend` on a run whose device is a GPU (`on_gpu`) with `world` ranks:
    /// world 1 sums nothing; `auto` is NCCL on a GPU and the host collective on the CPU;
    /// `nccl` on the CPU is refused (NCCL reduces device buffers).
    pub fn select(backend: GradBackend, on_gpu: bool, world: usize) -> Result<Self> {
        if world <= 1 {
            return Ok(GradReduce::Single);
        }
        Ok(match (backend, on_gpu) {
            (GradBackend::Nccl, false) => bail!(
                "[distributed] backend = \"nccl\" sums GPU gradients, but this run trains on the \
                 CPU: use backend = \"auto\" or \"host\", or device = \"cuda\""
            ),
            (GradBackend::Auto | GradBackend::Nccl, true) => GradReduce::Nccl,
            (GradBackend::Auto | GradBackend::Host, _) => GradReduce::Host,
        })
    }
}

/// This process's rank among the ranks of its node, as the launcher announces it (OpenMPI,
/// MPICH/Hydra, Slurm, torchrun-style `LOCAL_RANK`): a GPU run with several ranks on a node
/// opens `cuda:<local rank>` for `device = "cuda"`.
pub fn local_rank() -> Option<usize> {
    local_rank_from(|v| std::env::var(v).ok())
}

/// [`local_rank`] over an environment lookup (tests).
pub fn local_rank_from(var: impl Fn(&str) -> Option<String>) -> Option<usize> {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
        "LOCAL_RANK",
    ]
    .into_iter()
    .find_map(|v| var(v)?.trim().parse().ok())
}

/// The collective this process was started for: MPI when launched by `mpirun`/`srun` (the
/// launcher's environment says so) and built with the `mpi` feature, else a single process.
/// Launched by an MPI launcher with more than one rank but built without `mpi` is an error
/// (otherwise N independent runs would write the same run folder).
pub fn from_environment(timeout: std::time::Duration) -> Result<std::sync::Arc<dyn Collective>> {
    #[cfg(feature = "mpi")]
    {
        if launched_by_mpi() {
            return Ok(std::sync::Arc::new(mpi::MpiCollective::init(timeout)?));
        }
    }
    let _ = timeout;
    if let Some((var, n)) = announced_world_size() {
        if n > 1 {
            bail!(
                "started as one of {n} ranks ({var}={n}) but this gpg-rl was built without MPI \
                 support; rebuild with `cargo build --release -p gpg-rl --features mpi` \
                 (needs libopenmpi-dev and libclang-dev), or run a single process"
            );
        }
    }
    Ok(std::sync::Arc::new(SingleProcess))
}

/// Whether an MPI launcher (OpenMPI's mpirun, MPICH/Hydra, srun with PMI/PMIx) started this
/// process.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
fn launched_by_mpi() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

/// The number of ranks a launcher announced in the environment, if any.
fn announced_world_size() -> Option<(&'static str, usize)> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"]
        .into_iter()
        .find_map(|var| {
            let n = std::env::var(var).ok()?.parse().ok()?;
            Some((var, n))
        })
}

#[cfg(test)]
mod tests;
