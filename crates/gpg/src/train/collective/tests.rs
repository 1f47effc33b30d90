use std::time::{Duration, Instant};

use super::*;

fn run_group<R: Send + 'static>(
    world: usize,
    timeout: Duration,
    f: impl Fn(ThreadMember) -> R + Send + Sync + 'static,
) -> Vec<R> {
    let f = std::sync::Arc::new(f);
    let handles: Vec<_> = ThreadGroup::members(world, timeout)
        .into_iter()
        .map(|m| {
            let f = f.clone();
            std::thread::spawn(move || f(m))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn shares_are_contiguous_balanced_and_cover_everything() {
    for n in 0..20 {
        for world in 1..6 {
            let mut next = 0;
            for rank in 0..world {
                let s = share(n, rank, world);
                assert_eq!(s.start, next);
                assert!(s.len() == n / world || s.len() == n / world + 1);
                next = s.end;
            }
            assert_eq!(next, n);
        }
    }
}

#[test]
fn thread_group_sums_in_rank_order_and_broadcasts() {
    let out = run_group(3, Duration::from_secs(10), |m| {
        let r = m.rank();
        let mut f = vec![r as f32 + 0.5; 5];
        (&m as &dyn Collective).all_reduce_sum_f32(&mut f).unwrap();
        let mut d = vec![1e-17 * r as f64, 1.0];
        m.all_reduce_sum_f64(&mut d).unwrap();
        let mut u = vec![r as u64; 2];
        m.all_reduce_sum_u64(&mut u).unwrap();
        let mut b = if r == 1 {
            b"from one".to_vec()
        } else {
            Vec::new()
        };
        m.broadcast_bytes(&mut b, 1).unwrap();
        m.barrier().unwrap();
        let gathered = (&m as &dyn Collective)
            .gather_bytes(vec![r as u8; r + 1])
            .unwrap();
        (f, d, u, b, gathered)
    });
    for (f, d, u, b, gathered) in &out {
        assert_eq!(f, &vec![0.5 + 1.5 + 2.5; 5]);
        // Rank order: ((0 + 1e-17) + 2e-17), then 1+1+1; identical on every rank.
        assert_eq!(d[0].to_bits(), out[0].1[0].to_bits());
        assert_eq!(d[1], 3.0);
        assert_eq!(u, &vec![3, 3]);
        assert_eq!(b, b"from one");
        assert_eq!(gathered, &vec![vec![0u8], vec![1, 1], vec![2, 2, 2]]);
    }
}

#[test]
fn packed_slices_reduce_like_one_flat_buffer() {
    let out = run_group(2, Duration::from_secs(10), |m| {
        let r = m.rank() as f32;
        let mut a = vec![1.0 + r; 3];
        let mut b = vec![10.0 * (1.0 + r); 4];
        let mut empty: Vec<f32> = Vec::new();
        {
            let mut slices: Vec<&mut [f32]> = vec![&mut a, &mut empty, &mut b];
            (&m as &dyn Collective)
                .all_reduce_sum_slices(&mut slices)
                .unwrap();
        }
        (a, b)
    });
    for (a, b) in out {
        assert_eq!(a, vec![3.0; 3]);
        assert_eq!(b, vec![30.0; 4]);
    }
}

#[test]
fn ensure_same_fails_on_every_rank_when_one_differs() {
    let out = run_group(3, Duration::from_secs(10), |m| {
        let value = if m.rank() == 2 {
            b"b".to_vec()
        } else {
            b"a".to_vec()
        };
        (&m as &dyn Collective)
            .ensure_same(&value, "the parameter hash")
            .map_err(|e| e.to_string())
    });
    for r in &out {
        let e = r.as_ref().unwrap_err();
        assert!(
            e.contains("parameter hash differs between ranks: 1 of 3"),
            "{e}"
        );
    }
}

#[test]
fn a_member_that_errors_and_leaves_fails_the_others_promptly() {
    let t0 = Instant::now();
    let out = run_group(3, Duration::from_secs(60), |m| {
        if m.rank() == 1 {
            // Rank 1 hits an error before the first reduction and returns (drops its member).
            return Err("rank 1: reading the data failed".to_string());
        }
        let mut x = vec![1.0f32];
        m.all_reduce_sum_f32(&mut x).map_err(|e| e.to_string())
    });
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert!(out[0]
        .as_ref()
        .unwrap_err()
        .contains("rank 1 left the group"));
    assert!(out[2]
        .as_ref()
        .unwrap_err()
        .contains("rank 1 left the group"));
}

#[test]
fn an_abort_fails_the_others_with_its_reason() {
    let out = run_group(2, Duration::from_secs(60), |m| {
        if m.rank() == 0 {
            m.abort("out of memory");
            std::thread::sleep(Duration::from_millis(200));
            return Ok(());
        }
        m.barrier().map_err(|e| e.to_string())
    });
    assert!(out[1]
        .as_ref()
        .unwrap_err()
        .contains("rank 0 aborted: out of memory"));
}

#[test]
fn a_member_that_never_arrives_times_out() {
    let t0 = Instant::now();
    let out = run_group(2, Duration::from_millis(300), |m| {
        if m.rank() == 0 {
            // Stuck outside the collective for longer than the timeout, then arrives.
            std::thread::sleep(Duration::from_millis(1500));
        }
        m.barrier().map_err(|e| e.to_string())
    });
    assert!(t0.elapsed() < Duration::from_secs(10));
    let e = out[1].as_ref().unwrap_err();
    assert!(e.contains("rank(s) [0] did not arrive within 0.3 s"), "{e}");
    assert!(out[0].is_err());
}

#[test]
fn mismatched_operations_are_an_error_not_garbage() {
    let out = run_group(2, Duration::from_secs(10), |m| {
        let mut x = vec![0.0f32; 1 + m.rank()];
        m.all_reduce_sum_f32(&mut x).map_err(|e| e.to_string())
    });
    assert!(out
        .iter()
        .all(|r| r.as_ref().is_err_and(|e| e.contains("mismatch"))));
}

/// `[distributed] backend`: world 1 sums nothing; `auto` is NCCL on a GPU and the host
/// collective on the CPU; `nccl` on the CPU is refused with the fix; `host` always stages.
#[test]
fn the_gradient_backend_is_selected_from_the_recipe_device_and_world() {
    use GradBackend::*;
    for backend in [Auto, Nccl, Host] {
        for gpu in [false, true] {
            assert_eq!(
                GradReduce::select(backend, gpu, 1).unwrap(),
                GradReduce::Single
            );
        }
    }
    assert_eq!(GradReduce::select(Auto, true, 2).unwrap(), GradReduce::Nccl);
    assert_eq!(GradReduce::select(Nccl, true, 8).unwrap(), GradReduce::Nccl);
    assert_eq!(
        GradReduce::select(Auto, false, 2).unwrap(),
        GradReduce::Host
    );
    assert_eq!(
        GradReduce::select(Host, false, 2).unwrap(),
        GradReduce::Host
    );
    assert_eq!(GradReduce::select(Host, true, 2).unwrap(), GradReduce::Host);
    let e = GradReduce::select(Nccl, false, 2).unwrap_err().to_string();
    assert!(
        e.contains("nccl") && e.contains("CPU") && e.contains("host"),
        "{e}"
    );
}

/// The recipe key parses (lowercase names, default `auto`), unknown names are refused.
#[test]
fn the_backend_key_parses() {
    use crate::train::config::DistributedConfig;
    let parse = |s: &str| toml::from_str::<DistributedConfig>(s);
    assert_eq!(parse("").unwrap().backend, GradBackend::Auto);
    assert_eq!(
        parse("backend = \"nccl\"").unwrap().backend,
        GradBackend::Nccl
    );
    assert_eq!(
        parse("backend = \"host\"").unwrap().backend,
        GradBackend::Host
    );
    assert_eq!(
        parse("backend = \"auto\"").unwrap().backend,
        GradBackend::Auto
    );
    assert!(parse("backend = \"gloo\"").is_err());
    for b in [GradBackend::Auto, GradBackend::Nccl, GradBackend::Host] {
        let text = toml::to_string(&DistributedConfig {
            backend: b,
            ..Default::default()
        })
        .unwrap();
        assert!(text.contains(&format!("backend = \"{b}\"")), "{text}");
        assert_eq!(parse(&text).unwrap().backend, b);
    }
}

#[test]
fn the_node_local_rank_comes_from_the_launcher() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |v: &str| {
            pairs
                .iter()
                .find(|(k, _)| *k == v)
                .map(|(_, x)| x.to_string())
        }
    };
    assert_eq!(local_rank_from(env(&[])), None);
    assert_eq!(
        local_rank_from(env(&[("OMPI_COMM_WORLD_LOCAL_RANK", "3")])),
        Some(3)
    );
    assert_eq!(local_rank_from(env(&[("SLURM_LOCALID", "1")])), Some(1));
    assert_eq!(local_rank_from(env(&[("MPI_LOCALRANKID", "2")])), Some(2));
    assert_eq!(local_rank_from(env(&[("LOCAL_RANK", "x")])), None);
    // OpenMPI's variable first.
    assert_eq!(
        local_rank_from(env(&[
            ("LOCAL_RANK", "5"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "0")
        ])),
        Some(0)
    );
}
