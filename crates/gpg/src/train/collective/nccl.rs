//! Data parallel on GPUs with NCCL (feature `cuda`; NCCL is loaded at run time, like the rest
//! of CUDA, so nothing of it is needed to build).
//!
//! One process per GPU. The rank and the world come from the host collective the process was
//! started with (MPI: `mpirun -np N` / `srun`, as [`super::from_environment`]); rank 0 creates
//! NCCL's 128-byte unique id and broadcasts it over that collective, then every rank joins the
//! communicator on its device's stream ([`NcclCollective::init`]). The host operations of the
//! [`Collective`] trait (loss and metric sums, broadcasts, barrier, abort) stay on the host
//! collective; what NCCL carries is the CUDA engine's gradients, summed in place on the device
//! ([`DeviceGradReduce`]), in buckets ([`BucketPlan`]: contiguous runs of gradient leaves up to
//! [`BUCKET_BYTES`], in one fixed order, each bucket one NCCL group, i.e. one launch).
//!
//! When: after the backward of the step's last micro-batch (the trainer's all-reduce point),
//! enqueued on the device's one stream behind the backward's kernels, so the host does not wait
//! for it; the optimiser step's gradient norm reads the sums. Buckets go in the order the
//! backward finishes the leaves (head, final norm, last layer … first layer, embeddings). They
//! do not overlap the backward: a leaf's gradient is final only after the last micro-batch, which
//! the engine is not told, and the engine runs every kernel on one stream (an overlap needs a
//! second stream and events per bucket; the plan is ready for it).
//!
//! Guarantees, as the MPI path: every rank holds Σ_ranks g (a sum, then the same clipping and
//! AdamW step on every rank, from the same code); every rank issues the same operations in the
//! same order (the plan is a function of the model's leaf sizes; checked across ranks at set-up).
//! NCCL's sums are deterministic for a fixed world, topology and algorithm (ring/tree), but they
//! add in another order than MPI's or the thread group's, so the last bits differ from a host
//! run (the N-ranks-equal-one-process tolerance, 1e-5 in f32, covers it).
//!
//! A machine without libnccl gets an error that names the library and the two ways out
//! (install NCCL, or `[distributed] backend = "host"`), on every rank at once, never a panic.

use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::driver::{CudaSlice, CudaStream};
use cudarc::nccl::{Comm, Id, ReduceOp};

use super::{BucketPlan, Collective, GradReduce, BUCKET_BYTES};
use crate::model::cuda_train::CudaTrainStep;

/// What to tell a user whose machine has no loadable libnccl.
const HOW_TO_FIX: &str = "install NCCL on every node (e.g. `apt-get install libnccl2` from \
     NVIDIA's CUDA repository, or `pip install nvidia-nccl-cu12` and put a `libnccl.so` link to \
     its `libnccl.so.2` in a directory on LD_LIBRARY_PATH), or sum the gradients over the host \
     collective with `[distributed] backend = \"host\"` (slower: gradients staged through host \
     memory)";

/// `None` when libnccl loads, else the error message (the file names looked for and the fix).
pub fn nccl_missing() -> Option<String> {
    // SAFETY: only tries to dlopen the candidate names.
    if unsafe { cudarc::nccl::sys::is_culib_present() } {
        return None;
    }
    let mut names: Vec<String> = Vec::new();
    for n in cudarc::get_lib_name_candidates("nccl") {
        if !names.contains(&n) {
            names.push(n);
        }
    }
    Some(format!(
        "NCCL, needed to sum the gradients of a data-parallel GPU run, is not installed or not \
         on the library path: looked for {} (LD_LIBRARY_PATH and the system's library \
         directories); {HOW_TO_FIX}",
        names.join(", ")
    ))
}

/// Errors on every rank unless libnccl loads on every rank (the ranks agree first, so none is
/// left waiting for one that failed).
pub fn check_library(host: &dyn Collective) -> Result<()> {
    let missing = nccl_missing();
    let mut count = [u64::from(missing.is_some())];
    host.all_reduce_sum_u64(&mut count)?;
    if let Some(m) = missing {
        bail!("rank {}: {m}", host.rank());
    }
    if count[0] > 0 {
        bail!(
            "{} of {} ranks cannot load libnccl (their errors name the files looked for); {HOW_TO_FIX}",
            count[0],
            host.world()
        );
    }
    Ok(())
}

/// NCCL's version (e.g. 22703 → "2.27.3"), once the library is known to load.
fn nccl_version() -> String {
    match cudarc::nccl::result::get_nccl_version() {
        Ok(v) => format!("{}.{}.{}", v / 10000, v / 100 % 100, v % 100),
        Err(_) => "unknown version".into(),
    }
}

/// The communicator (NCCL's handle is a raw pointer).
struct Handle(Comm);

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it are not
// concurrent; every call goes through the `Mutex` in `NcclCollective`.
unsafe impl Send for Handle {}

/// A [`Collective`] whose rank and world are the host collective's, with an NCCL communicator
/// of the same ranks for device buffers ([`Self::all_reduce_device_f32`]).
pub struct NcclCollective {
    host: Arc<dyn Collective>,
    comm: Mutex<Handle>,
    version: String,
}

impl NcclCollective {
    /// Joins the NCCL communicator of `host`'s ranks on `stream`'s device: every rank checks
    /// that libnccl loads (all fail together if one cannot), rank 0 creates the unique id and
    /// broadcasts it (or its error) over `host`, every rank initialises its communicator.
    pub fn init(host: Arc<dyn Collective>, stream: Arc<CudaStream>) -> Result<Self> {
        check_library(&*host)?;
        let (rank, world) = (host.rank(), host.world());
        // Rank 0's id, or its error, to every rank: "ok" + 128 bytes, or "er" + message.
        let mut msg = Vec::new();
        if rank == 0 {
            match Id::new() {
                Ok(id) => {
                    msg.extend_from_slice(b"ok");
                    msg.extend(id.internal().iter().map(|&c| c as u8));
                }
                Err(e) => {
                    msg.extend_from_slice(b"er");
                    msg.extend(format!("ncclGetUniqueId failed: {e:?}").into_bytes());
                }
            }
        }
        host.broadcast_bytes(&mut msg, 0)
            .context("NCCL: sending the unique id from rank 0")?;
        let id = decode_id(&msg)?;
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| anyhow!("NCCL: binding the CUDA context: {e:?}"))?;
        let comm = Comm::from_rank(stream, rank, world, id).map_err(|e| {
            anyhow!(
                "NCCL: rank {rank} of {world} cannot join the communicator (ncclCommInitRank): \
                 {e:?}; two ranks on one GPU (each rank needs its own: device = \"cuda\" opens \
                 cuda:<local rank>), or a network NCCL cannot use (NCCL_DEBUG=INFO says which)"
            )
        })?;
        Ok(Self {
            host,
            comm: Mutex::new(Handle(comm)),
            version: nccl_version(),
        })
    }

    /// NCCL's version, for logs.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Sums `bufs` (every rank's, leaf by leaf) over the ranks in place on the device, bucket
    /// by bucket of `plan` (one NCCL group each), enqueued on the communicator's stream.
    pub fn all_reduce_device_f32(
        &self,
        bufs: &mut [&mut CudaSlice<f32>],
        plan: &BucketPlan,
    ) -> Result<()> {
        ensure!(
            bufs.len() == plan.leaves(),
            "internal: {} gradient buffers for a bucket plan of {} leaves",
            bufs.len(),
            plan.leaves()
        );
        let comm = self
            .comm
            .lock()
            .map_err(|_| anyhow!("NCCL: a thread panicked during a collective"))?;
        comm.0
            .context()
            .bind_to_thread()
            .map_err(|e| anyhow!("NCCL: binding the CUDA context: {e:?}"))?;
        for (b, leaves) in plan.buckets().iter().enumerate() {
            cudarc::nccl::group_start().map_err(|e| anyhow!("NCCL: ncclGroupStart: {e:?}"))?;
            let mut issued = Ok(());
            for buf in bufs[leaves.clone()].iter_mut() {
                if buf.is_empty() {
                    continue;
                }
                if let Err(e) = comm.0.all_reduce_in_place(&mut **buf, &ReduceOp::Sum) {
                    issued = Err(e);
                    break;
                }
            }
            // The group is closed whatever happened inside it.
            let ended = cudarc::nccl::group_end();
            issued
                .and(ended)
                .map_err(|e| anyhow!("NCCL: all-reduce of gradient bucket {b}: {e:?}"))?;
        }
        Ok(())
    }
}

/// Rank 0's broadcast message → the unique id, or rank 0's error.
fn decode_id(msg: &[u8]) -> Result<Id> {
    match msg.split_at_checked(2) {
        Some((b"ok", id)) if id.len() == 128 => {
            let mut internal = [0 as std::ffi::c_char; 128];
            for (d, &s) in internal.iter_mut().zip(id) {
                *d = s as std::ffi::c_char;
            }
            Ok(Id::uninit(internal))
        }
        Some((b"er", why)) => bail!("NCCL on rank 0: {}", String::from_utf8_lossy(why)),
        _ => bail!(
            "NCCL: a malformed unique id from rank 0 ({} bytes)",
            msg.len()
        ),
    }
}

/// Host operations go over the host collective (MPI): only device buffers use NCCL.
impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.host.rank()
    }
    fn world(&self) -> usize {
        self.host.world()
    }
    fn backend(&self) -> &'static str {
        "nccl"
    }
    fn all_reduce_sum_f32(&self, data: &mut [f32]) -> Result<()> {
        self.host.all_reduce_sum_f32(data)
    }
    fn all_reduce_sum_f64(&self, data: &mut [f64]) -> Result<()> {
        self.host.all_reduce_sum_f64(data)
    }
    fn all_reduce_sum_u64(&self, data: &mut [u64]) -> Result<()> {
        self.host.all_reduce_sum_u64(data)
    }
    fn broadcast_bytes(&self, data: &mut Vec<u8>, root: usize) -> Result<()> {
        self.host.broadcast_bytes(data, root)
    }
    fn barrier(&self) -> Result<()> {
        self.host.barrier()
    }
    fn abort(&self, reason: &str) {
        self.host.abort(reason)
    }
}

/// How the CUDA engine sums its device gradients over ranks.
pub enum DeviceGradReduce {
    /// Downloaded, summed over the host collective as one flat buffer, uploaded
    /// (`backend = "host"`).
    Host,
    /// Summed in place on the device by NCCL, in the buckets of `plan` (over the leaves in the
    /// order the backward finishes them: the tree's order reversed).
    Nccl {
        comm: NcclCollective,
        plan: BucketPlan,
    },
}

impl DeviceGradReduce {
    /// Sets up `reduce` for `step`'s gradients over `host`'s ranks: `None` for a single
    /// process. Returns what was set up, for the log.
    pub fn new(
        reduce: GradReduce,
        host: &Arc<dyn Collective>,
        step: &mut CudaTrainStep,
    ) -> Result<(Option<Self>, String)> {
        match reduce {
            GradReduce::Single => Ok((None, "single process".into())),
            GradReduce::Host => Ok((
                Some(DeviceGradReduce::Host),
                format!(
                    "host: device gradients downloaded, summed over {}, uploaded",
                    host.backend()
                ),
            )),
            GradReduce::Nccl => {
                let stream = step.gpu().stream.clone();
                let lens: Vec<usize> = backward_order(step.gradient_buffers_mut()?)
                    .iter()
                    .map(|b| b.len())
                    .collect();
                let plan = BucketPlan::new(&lens, std::mem::size_of::<f32>(), BUCKET_BYTES)?;
                host.ensure_same(&plan.digest(), "the NCCL bucket plan (gradient leaf sizes)")?;
                let comm = NcclCollective::init(host.clone(), stream)?;
                let what = format!(
                    "nccl {}: device gradients summed in place, {} leaves in {} buckets of ≤ {} MiB",
                    comm.version(),
                    plan.leaves(),
                    plan.buckets().len(),
                    BUCKET_BYTES >> 20
                );
                Ok((Some(DeviceGradReduce::Nccl { comm, plan }), what))
            }
        }
    }

    /// Σ over ranks of `step`'s gradients, in place (every rank calls it at the same point).
    pub fn all_reduce(&self, step: &mut CudaTrainStep, host: &dyn Collective) -> Result<()> {
        match self {
            DeviceGradReduce::Nccl { comm, plan } => {
                let mut bufs = backward_order(step.gradient_buffers_mut()?);
                comm.all_reduce_device_f32(&mut bufs, plan)
            }
            DeviceGradReduce::Host => {
                let gpu = step.gpu().clone();
                let mut bufs = step.gradient_buffers_mut()?;
                let mut values = Vec::with_capacity(bufs.len());
                for b in bufs.iter() {
                    values.push(
                        gpu.stream
                            .clone_dtoh(&**b)
                            .map_err(|e| anyhow!("cuda: downloading a gradient: {e:?}"))?,
                    );
                }
                gpu.sync("gradient download")?;
                {
                    let mut slices: Vec<&mut [f32]> =
                        values.iter_mut().map(|v| v.as_mut_slice()).collect();
                    host.all_reduce_sum_slices(&mut slices)?;
                }
                for (b, v) in bufs.iter_mut().zip(&values) {
                    gpu.stream
                        .memcpy_htod(v.as_slice(), &mut **b)
                        .map_err(|e| anyhow!("cuda: uploading a summed gradient: {e:?}"))?;
                }
                gpu.sync("gradient upload")
            }
        }
    }
}

/// The gradient buffers in the order the backward finishes them (the tree's order reversed).
fn backward_order(mut bufs: Vec<&mut CudaSlice<f32>>) -> Vec<&mut CudaSlice<f32>> {
    bufs.reverse();
    bufs
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::train::collective::{SingleProcess, ThreadGroup};

    /// This machine has no libnccl (CI, the build machines): the error names the library,
    /// the files looked for and both fixes, on every rank together, and nothing panics.
    /// Where NCCL is installed the check passes instead.
    #[test]
    fn a_missing_libnccl_is_a_clear_error_on_every_rank() {
        let Some(msg) = nccl_missing() else {
            check_library(&SingleProcess).unwrap();
            eprintln!("libnccl loads here: the missing-library error is not exercised");
            return;
        };
        assert!(msg.contains("libnccl.so"), "{msg}");
        assert!(
            msg.contains("NCCL") && msg.contains("LD_LIBRARY_PATH"),
            "{msg}"
        );
        assert!(msg.contains("backend = \"host\""), "{msg}");
        let e = check_library(&SingleProcess).unwrap_err().to_string();
        assert!(e.contains("libnccl.so") && e.contains("rank 0"), "{e}");
        // Two ranks: both fail (neither is left waiting), each with the library named.
        let handles: Vec<_> = ThreadGroup::members(2, Duration::from_secs(20))
            .into_iter()
            .map(|m| std::thread::spawn(move || check_library(&m).map_err(|e| e.to_string())))
            .collect();
        for h in handles {
            let e = h.join().expect("no panic").unwrap_err();
            assert!(
                e.contains("libnccl") && e.contains("backend = \"host\""),
                "{e}"
            );
        }
    }

    /// `NcclCollective::init` over a host group whose machine lacks libnccl fails on every
    /// rank before any NCCL call (so before it needs a device): exercised through the
    /// library check, which `init` runs first. The unique id's wire format round-trips and a
    /// rank 0 failure reaches the other ranks as an error.
    #[test]
    fn the_unique_id_message_round_trips_and_rank_0_errors_propagate() {
        let mut msg = b"ok".to_vec();
        msg.extend((0..128u32).map(|i| (i * 37 % 256) as u8));
        let id = decode_id(&msg).unwrap();
        let back: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
        assert_eq!(back, msg[2..]);
        let e = decode_id(b"erncclGetUniqueId failed: x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank 0") && e.contains("ncclGetUniqueId"), "{e}");
        assert!(decode_id(b"ok\x01\x02").is_err());
        assert!(decode_id(b"").is_err());
    }
}

/// On a GPU only (`bench/gpu/check-a.sh` runs them with GPG_RL_REQUIRE_GPU=1; elsewhere, or
/// without libnccl, they skip, saying why): NCCL at world 1 (the device tool lends one GPU) —
/// the communicator is made from a unique id sent over the host collective, bucketed in-place
/// sums leave every buffer as it was, and a train step whose gradients went through NCCL, or
/// through the host, equals one without, bit for bit. Two ranks stay unmeasured.
#[cfg(test)]
mod gpu_tests {
    use std::sync::Arc;

    use crate::model::ops::cuda::Gpu;
    use crate::model::{Activations, Qwen2, TrainBatch};
    use crate::optim::AdamW;
    use crate::train::collective::{BucketPlan, Collective, GradReduce, SingleProcess};
    use crate::train::engine::{CudaEngine, StepOutcome, TrainEngine};
    use crate::train::policy::{Policy, PolicyBatch};

    use super::{nccl_missing, NcclCollective};

    fn gpu_with_nccl() -> Option<Arc<Gpu>> {
        let g = match Gpu::open(0) {
            Ok(g) => g,
            Err(e) if std::env::var_os("GPG_RL_REQUIRE_GPU").is_some() => {
                panic!("GPG_RL_REQUIRE_GPU is set but no GPU opened: {e:#}")
            }
            Err(e) => {
                eprintln!("skipped (no GPU): {e:#}");
                return None;
            }
        };
        if let Some(m) = nccl_missing() {
            eprintln!("skipped (no NCCL): {m}");
            return None;
        }
        Some(g)
    }

    #[test]
    fn gpu_nccl_at_world_1_sums_device_buffers_in_buckets() {
        let Some(g) = gpu_with_nccl() else { return };
        let host: Arc<dyn Collective> = Arc::new(SingleProcess);
        let comm = NcclCollective::init(host, g.stream.clone()).unwrap();
        eprintln!("NCCL {}", comm.version());
        let lens = [5usize, 1, 1000, 3, 70_000, 17];
        let values: Vec<Vec<f32>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| (i * 1000 + j) as f32 * 0.37 - 3.0).collect())
            .collect();
        let mut bufs: Vec<_> = values
            .iter()
            .map(|v| g.stream.clone_htod(v).unwrap())
            .collect();
        let plan = BucketPlan::new(&lens, 4, 4096).unwrap();
        assert!(plan.buckets().len() > 2);
        let mut refs: Vec<_> = bufs.iter_mut().collect();
        comm.all_reduce_device_f32(&mut refs, &plan).unwrap();
        for (b, want) in bufs.iter().zip(&values) {
            assert_eq!(&g.stream.clone_dtoh(b).unwrap(), want);
        }
        // A plan of another length is refused, not a wrong launch.
        let mut refs: Vec<_> = bufs.iter_mut().collect();
        let short = BucketPlan::new(&lens[..2], 4, 4096).unwrap();
        assert!(comm.all_reduce_device_f32(&mut refs, &short).is_err());
    }

    #[test]
    fn gpu_a_step_through_nccl_or_the_host_at_world_1_is_the_plain_step() {
        let Some(g) = gpu_with_nccl() else { return };
        let config: crate::model::Qwen2Config = serde_json::from_value(serde_json::json!({
            "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 128, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": false
        }))
        .unwrap();
        let host_model =
            Policy::Text(Qwen2::random(config, 0.2, 5, &candle_core::Device::Cpu).unwrap());
        let batch = PolicyBatch::Text(
            TrainBatch::new(&[
                (&[1u32, 2, 3, 4][..], &[5u32, 6, 7][..]),
                (&[9u32, 8][..], &[7u32, 6, 5, 4][..]),
            ])
            .unwrap(),
        );
        let g_t = [0.3f32, -0.2, 0.1, -0.05, 0.2, -0.3, 0.15];
        let collective: Arc<dyn Collective> = Arc::new(SingleProcess);
        let mut masters = Vec::new();
        for reduce in [None, Some(GradReduce::Host), Some(GradReduce::Nccl)] {
            let mut e = CudaEngine::new(
                g.clone(),
                &host_model,
                AdamW::new(Default::default()).unwrap(),
            )
            .unwrap();
            if let Some(r) = reduce {
                let what = e.prepare_all_reduce(r, &collective).unwrap();
                eprintln!("{r:?}: {what}");
            }
            let (_, cache) = e
                .forward(&host_model, &batch, 1.0, Activations::All)
                .unwrap();
            e.backward_into(&host_model, &batch, cache, &g_t).unwrap();
            if reduce.is_some() {
                e.all_reduce_gradients(&*collective).unwrap();
            }
            assert!(matches!(
                e.step(&host_model, 1e-2, 1.0).unwrap(),
                StepOutcome::Applied(_)
            ));
            masters.push(e.train_step().masters().unwrap());
        }
        assert_eq!(masters[0], masters[1], "host-staged sum at world 1");
        assert_eq!(masters[0], masters[2], "NCCL sum at world 1");
    }
}
