//! N ranks as threads of one process, for tests of data-parallel code.
//!
//! Every operation is a rendezvous: each member deposits its contribution; the last one to
//! arrive publishes the whole set; each member then computes the result from the published
//! contributions in rank order (a sum x₀ + x₁ + … in that order), so all members get
//! bit-identical results, as a deterministic MPI reduction does.
//!
//! Failure: a member that calls [`Collective::abort`] or is dropped before the group is done
//! marks the group broken; members waiting in or later entering an operation get an error
//! naming it. A member that neither arrives nor leaves within the group's timeout makes the
//! others fail with a timeout error. No member ever waits forever.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::Collective;

/// One member's contribution to an operation.
#[derive(Debug, Clone)]
enum Payload {
    F32(Vec<f32>),
    F64(Vec<f64>),
    U64(Vec<u64>),
    /// Broadcast: the root sends its bytes, the others `None`.
    Bytes(Option<Vec<u8>>),
    Barrier,
}

impl Payload {
    fn kind(&self) -> (&'static str, usize) {
        match self {
            Payload::F32(v) => ("all_reduce_sum_f32", v.len()),
            Payload::F64(v) => ("all_reduce_sum_f64", v.len()),
            Payload::U64(v) => ("all_reduce_sum_u64", v.len()),
            Payload::Bytes(_) => ("broadcast_bytes", 0),
            Payload::Barrier => ("barrier", 0),
        }
    }
}

struct State {
    /// Operations completed (published) so far.
    generation: u64,
    pending: Vec<Option<Payload>>,
    /// The contributions of operation `generation − 1`.
    published: Option<Arc<Vec<Payload>>>,
    broken: Option<String>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    world: usize,
    timeout: Duration,
}

/// A group of N in-process ranks; [`ThreadGroup::members`] returns one member per rank, to be
/// moved into its thread.
pub struct ThreadGroup;

impl ThreadGroup {
    /// `world` members; an operation that waits longer than `timeout` for the others fails.
    pub fn members(world: usize, timeout: Duration) -> Vec<ThreadMember> {
        assert!(world >= 1, "a thread group needs at least one member");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                generation: 0,
                pending: vec![None; world],
                published: None,
                broken: None,
            }),
            changed: Condvar::new(),
            world,
            timeout,
        });
        (0..world)
            .map(|rank| ThreadMember {
                shared: shared.clone(),
                rank,
                operations: std::sync::atomic::AtomicU64::new(0),
            })
            .collect()
    }
}

/// One rank of a [`ThreadGroup`].
pub struct ThreadMember {
    shared: Arc<Shared>,
    rank: usize,
    /// Operations this member has entered (its own generation counter).
    operations: std::sync::atomic::AtomicU64,
}

impl ThreadMember {
    /// Deposits `mine` for the next operation and returns everyone's contributions.
    fn exchange(&self, mine: Payload) -> Result<Arc<Vec<Payload>>> {
        let (op, len) = mine.kind();
        let my_gen = self
            .operations
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let shared = &*self.shared;
        let mut st = shared
            .state
            .lock()
            .map_err(|_| anyhow::anyhow!("thread group: a member panicked"))?;
        if let Some(reason) = &st.broken {
            bail!("rank {}: {op} #{my_gen} cannot run: {reason}", self.rank);
        }
        debug_assert_eq!(st.generation, my_gen);
        st.pending[self.rank] = Some(mine);
        if st.pending.iter().all(Option::is_some) {
            let all: Vec<Payload> = st
                .pending
                .iter_mut()
                .map(|p| p.take().unwrap_or(Payload::Barrier))
                .collect();
            // Every member must have called the same operation with the same length.
            for (r, p) in all.iter().enumerate() {
                if p.kind() != (op, len) {
                    let reason = format!(
                        "operation #{my_gen} mismatch: rank {r} called {:?}, rank {} called {:?}",
                        p.kind(),
                        self.rank,
                        (op, len)
                    );
                    st.broken = Some(reason.clone());
                    shared.changed.notify_all();
                    bail!("{reason}");
                }
            }
            st.published = Some(Arc::new(all));
            st.generation += 1;
            shared.changed.notify_all();
        }
        let deadline = Instant::now() + shared.timeout;
        loop {
            if st.generation > my_gen {
                return Ok(st.published.clone().expect("published with the generation"));
            }
            if let Some(reason) = &st.broken {
                bail!("rank {}: {op} #{my_gen} failed: {reason}", self.rank);
            }
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<usize> = st
                    .pending
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| p.is_none())
                    .map(|(r, _)| r)
                    .collect();
                let reason = format!(
                    "{op} #{my_gen}: rank(s) {missing:?} did not arrive within {:.1} s",
                    shared.timeout.as_secs_f64()
                );
                st.broken = Some(reason.clone());
                shared.changed.notify_all();
                bail!("rank {}: {reason}", self.rank);
            }
            st = shared
                .changed
                .wait_timeout(st, deadline - now)
                .map_err(|_| anyhow::anyhow!("thread group: a member panicked"))?
                .0;
        }
    }

    fn mark_broken(&self, reason: String) {
        if let Ok(mut st) = self.shared.state.lock() {
            if st.broken.is_none() {
                st.broken = Some(reason);
            }
            self.shared.changed.notify_all();
        }
    }
}

impl Drop for ThreadMember {
    /// A member that leaves ends the group for the others (as a dead MPI process ends the
    /// job): their later operations fail instead of waiting for it.
    fn drop(&mut self) {
        let rank = self.rank;
        self.mark_broken(format!("rank {rank} left the group"));
    }
}

fn sum_in_rank_order<T: Copy + std::ops::AddAssign>(
    out: &mut [T],
    all: &[Payload],
    get: impl Fn(&Payload) -> Option<&Vec<T>>,
) {
    let mut first = true;
    for p in all {
        let Some(v) = get(p) else { continue };
        if first {
            out.copy_from_slice(v);
            first = false;
        } else {
            out.iter_mut().zip(v).for_each(|(o, x)| *o += *x);
        }
    }
}

impl Collective for ThreadMember {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.shared.world
    }
    fn backend(&self) -> &'static str {
        "threads"
    }
    fn all_reduce_sum_f32(&self, data: &mut [f32]) -> Result<()> {
        let all = self.exchange(Payload::F32(data.to_vec()))?;
        sum_in_rank_order(data, &all, |p| match p {
            Payload::F32(v) => Some(v),
            _ => None,
        });
        Ok(())
    }
    fn all_reduce_sum_f64(&self, data: &mut [f64]) -> Result<()> {
        let all = self.exchange(Payload::F64(data.to_vec()))?;
        sum_in_rank_order(data, &all, |p| match p {
            Payload::F64(v) => Some(v),
            _ => None,
        });
        Ok(())
    }
    fn all_reduce_sum_u64(&self, data: &mut [u64]) -> Result<()> {
        let all = self.exchange(Payload::U64(data.to_vec()))?;
        sum_in_rank_order(data, &all, |p| match p {
            Payload::U64(v) => Some(v),
            _ => None,
        });
        Ok(())
    }
    fn broadcast_bytes(&self, data: &mut Vec<u8>, root: usize) -> Result<()> {
        if root >= self.world() {
            bail!("broadcast from rank {root} in a world of {}", self.world());
        }
        let mine = (self.rank == root).then(|| data.clone());
        let all = self.exchange(Payload::Bytes(mine))?;
        match &all[root] {
            Payload::Bytes(Some(bytes)) => {
                if self.rank != root {
                    data.clone_from(bytes);
                }
                Ok(())
            }
            _ => bail!("broadcast: rank {root} did not send (the ranks disagree on the root)"),
        }
    }
    fn barrier(&self) -> Result<()> {
        self.exchange(Payload::Barrier).map(|_| ())
    }
    fn abort(&self, reason: &str) {
        self.mark_broken(format!("rank {} aborted: {reason}", self.rank));
    }
}
