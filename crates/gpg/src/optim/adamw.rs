//! AdamW with decoupled weight decay, as `torch.optim.AdamW` (amsgrad = false, maximize = false).
//!
//! For each parameter p with gradient g, at its step t (1 on its first update):
//!
//! ```text
//! p ← p · (1 − lr · wd)                       decoupled weight decay (only if the flag is set)
//! m ← m + (1 − β1) · (g − m)                  = β1 m + (1 − β1) g   (torch: lerp)
//! v ← β2 · v + (1 − β2) · g²
//! p ← p − (lr / (1 − β1^t)) · m / (sqrt(v) / sqrt(1 − β2^t) + eps)
//! ```
//!
//! which is Adam with bias correction m̂ = m / (1 − β1^t), v̂ = v / (1 − β2^t) and eps added to
//! sqrt(v̂), in torch's order of operations: scalars (1 − lr·wd, bias corrections, step size)
//! in f64 as Python computes them, element-wise arithmetic in f32 as torch does for f32
//! tensors. Each parameter keeps its own step count, as torch does (a parameter without a
//! gradient in some step is simply not updated that step).
//!
//! The state (m, v, step per named parameter) is owned by the optimiser and is exactly
//! restorable: [`AdamW::state`] / [`AdamW::from_state`] (serde, or read the f32 vectors directly
//! to write them as tensors).

use std::collections::BTreeMap;

use anyhow::{ensure, Context, Result};
use rayon::prelude::*;

/// Element count above which a parameter's update is split across rayon threads.
const PARALLEL_MIN_LEN: usize = 1 << 16;
/// Elements per rayon task.
const PARALLEL_CHUNK: usize = 1 << 15;

/// AdamW hyper-parameters except the learning rate (which the schedule supplies each step).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    /// β1, decay of the first moment (torch default 0.9).
    pub beta1: f64,
    /// β2, decay of the second moment (torch default 0.999).
    pub beta2: f64,
    /// eps added to sqrt(v̂) (torch default 1e-8).
    pub eps: f64,
    /// Decoupled weight decay (torch default 0.01; the HF Trainer's default is 0.0).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

impl AdamWConfig {
    /// Checks 0 ≤ β1, β2 < 1, eps ≥ 0, weight_decay ≥ 0 (torch's checks).
    pub fn validate(&self) -> Result<()> {
        ensure!(
            (0.0..1.0).contains(&self.beta1),
            "AdamW beta1 must be in [0, 1), got {}",
            self.beta1
        );
        ensure!(
            (0.0..1.0).contains(&self.beta2),
            "AdamW beta2 must be in [0, 1), got {}",
            self.beta2
        );
        ensure!(
            self.eps >= 0.0 && self.eps.is_finite(),
            "AdamW eps must be ≥ 0, got {}",
            self.eps
        );
        ensure!(
            self.weight_decay >= 0.0 && self.weight_decay.is_finite(),
            "AdamW weight_decay must be ≥ 0, got {}",
            self.weight_decay
        );
        Ok(())
    }
}

/// One parameter's optimiser state: torch's `step`, `exp_avg` (m) and `exp_avg_sq` (v).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ParamState {
    /// Updates applied to this parameter so far.
    pub step: u64,
    /// First moment m, one per element.
    pub exp_avg: Vec<f32>,
    /// Second moment v, one per element.
    pub exp_avg_sq: Vec<f32>,
}

/// The whole optimiser state, enough to resume exactly.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWState {
    /// The hyper-parameters.
    pub config: AdamWConfig,
    /// Per-parameter state by parameter name.
    pub params: BTreeMap<String, ParamState>,
}

/// A named parameter buffer, its gradient, and whether weight decay applies to it.
#[derive(Debug)]
pub struct ParamGrad<'a> {
    /// The parameter's name (the key of its state).
    pub name: &'a str,
    /// The parameter values, updated in place.
    pub param: &'a mut [f32],
    /// Its gradient, same length.
    pub grad: &'a [f32],
    /// Apply decoupled weight decay (torch applies it to every parameter by default).
    pub weight_decay: bool,
}

/// The AdamW optimiser; see the module docs for the update.
#[derive(Debug, Clone)]
pub struct AdamW {
    state: AdamWState,
}

impl AdamW {
    /// A fresh optimiser (no state yet; each parameter's state is created on its first update).
    pub fn new(config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            state: AdamWState {
                config,
                params: BTreeMap::new(),
            },
        })
    }

    /// An optimiser resuming from a saved state; errors on an invalid config or on moment
    /// vectors of different lengths.
    pub fn from_state(state: AdamWState) -> Result<Self> {
        state.config.validate()?;
        for (name, p) in &state.params {
            ensure!(
                p.exp_avg.len() == p.exp_avg_sq.len(),
                "AdamW state of {name}: exp_avg has {} elements, exp_avg_sq {}",
                p.exp_avg.len(),
                p.exp_avg_sq.len()
            );
        }
        Ok(Self { state })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.state.config
    }

    /// The state, to save in a checkpoint.
    pub fn state(&self) -> &AdamWState {
        &self.state
    }

    /// Consumes the optimiser, returning its state.
    pub fn into_state(self) -> AdamWState {
        self.state
    }

    /// Updates every given parameter with learning rate `lr`.
    pub fn step<'a>(
        &mut self,
        lr: f32,
        params: impl IntoIterator<Item = ParamGrad<'a>>,
    ) -> Result<()> {
        for p in params {
            self.update(lr, p)?;
        }
        Ok(())
    }

    /// Updates one parameter with learning rate `lr` (its step count advances by one).
    pub fn update(&mut self, lr: f32, p: ParamGrad<'_>) -> Result<()> {
        let n = p.param.len();
        let (scalars, state) = self.begin_update(lr, p.name, n, p.grad, p.weight_decay)?;
        if n >= PARALLEL_MIN_LEN {
            p.param
                .par_chunks_mut(PARALLEL_CHUNK)
                .zip(p.grad.par_chunks(PARALLEL_CHUNK))
                .zip(state.exp_avg.par_chunks_mut(PARALLEL_CHUNK))
                .zip(state.exp_avg_sq.par_chunks_mut(PARALLEL_CHUNK))
                .for_each(|(((x, g), m), v)| scalars.apply(x, g, m, v));
        } else {
            scalars.apply(p.param, p.grad, &mut state.exp_avg, &mut state.exp_avg_sq);
        }
        Ok(())
    }

    /// The bookkeeping of one update of parameter `name` (`n` values, gradient `grad`): checks,
    /// its state (created on its first update), its step count advanced by one, and the step's
    /// scalars, for a caller that applies [`StepScalars::apply`] to values it holds itself (a
    /// bf16 leaf's split master, `optim::master`). The update is element-wise, so any cut of
    /// the values into pieces gives the same result.
    pub(crate) fn begin_update(
        &mut self,
        lr: f32,
        name: &str,
        n: usize,
        grad: &[f32],
        weight_decay: bool,
    ) -> Result<(StepScalars, &mut ParamState)> {
        ensure!(
            lr.is_finite() && lr >= 0.0,
            "learning rate must be finite and ≥ 0, got {lr}"
        );
        ensure!(
            grad.len() == n,
            "parameter {}: {} values but {} gradient elements",
            name,
            n,
            grad.len()
        );
        let config = self.state.config;
        let state = self
            .state
            .params
            .entry(name.to_string())
            .or_insert_with(|| ParamState {
                step: 0,
                exp_avg: vec![0.0; n],
                exp_avg_sq: vec![0.0; n],
            });
        ensure!(
            state.exp_avg.len() == n && state.exp_avg_sq.len() == n,
            "parameter {}: optimiser state has {} elements, parameter {}",
            name,
            state.exp_avg.len(),
            n
        );
        state.step += 1;
        let scalars = StepScalars::new(&config, lr as f64, state.step, weight_decay)
            .with_context(|| format!("AdamW step {} of {}", state.step, name))?;
        Ok((scalars, state))
    }
}

/// The per-step scalars, computed once in f64 and rounded to f32 as torch passes them (the
/// GPU engine hands the same numbers to its AdamW kernel).
#[derive(Debug, Clone, Copy)]
pub struct StepScalars {
    /// 1 − lr·wd (1 without weight decay).
    pub decay: f32,
    /// 1 − β1, the lerp weight.
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    /// lr / (1 − β1^t).
    pub step_size: f32,
    /// sqrt(1 − β2^t).
    pub bias_correction2_sqrt: f32,
    pub eps: f32,
}

impl StepScalars {
    /// The scalars of a parameter's update number `step` (1 on its first) at `lr`.
    pub fn new(config: &AdamWConfig, lr: f64, step: u64, weight_decay: bool) -> Result<Self> {
        let exponent = i32::try_from(step).unwrap_or(i32::MAX);
        let bias_correction1 = 1.0 - config.beta1.powi(exponent);
        let bias_correction2 = 1.0 - config.beta2.powi(exponent);
        ensure!(
            bias_correction1 > 0.0,
            "bias correction 1 − β1^t is 0 (β1 = {})",
            config.beta1
        );
        Ok(Self {
            decay: if weight_decay {
                (1.0 - lr * config.weight_decay) as f32
            } else {
                1.0
            },
            one_minus_beta1: (1.0 - config.beta1) as f32,
            beta2: config.beta2 as f32,
            one_minus_beta2: (1.0 - config.beta2) as f32,
            step_size: (lr / bias_correction1) as f32,
            bias_correction2_sqrt: bias_correction2.sqrt() as f32,
            eps: config.eps as f32,
        })
    }

    /// The element-wise update over matching slices.
    pub(crate) fn apply(&self, param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32]) {
        let w = self.one_minus_beta1;
        let small_weight = w.abs() < 0.5;
        for (((x, &g), m), v) in param.iter_mut().zip(grad).zip(m).zip(v) {
            *x *= self.decay;
            // torch's lerp(m, g, w): two algebraically equal forms chosen by |w| < 0.5.
            *m = if small_weight {
                *m + w * (g - *m)
            } else {
                g - (g - *m) * (1.0 - w)
            };
            *v = *v * self.beta2 + self.one_minus_beta2 * g * g;
            let denom = v.sqrt() / self.bias_correction2_sqrt + self.eps;
            *x += -self.step_size * (*m / denom);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_close(a: f32, b: f64, tol: f64, what: &str) {
        assert!((a as f64 - b).abs() <= tol, "{what}: {a} vs {b}");
    }

    /// Two steps by hand, lr = 0.1, β1 = 0.9, β2 = 0.999, eps = 1e-8, wd = 0.1, p0 = 1.
    ///
    /// Step 1, g = 0.5:
    ///   decay: p = 1 · (1 − 0.1·0.1) = 0.99
    ///   m = 0.1 · 0.5 = 0.05;  v = 0.001 · 0.25 = 0.00025
    ///   m̂ = 0.05 / 0.1 = 0.5;  v̂ = 0.00025 / 0.001 = 0.25;  sqrt(v̂) = 0.5
    ///   p = 0.99 − 0.1 · 0.5 / (0.5 + 1e-8) = 0.99 − 0.1 · 0.99999998 = 0.890000002
    /// Step 2, g = −0.25:
    ///   decay: p = 0.890000002 · 0.99 = 0.88110000198
    ///   m = 0.9·0.05 + 0.1·(−0.25) = 0.045 − 0.025 = 0.02
    ///   v = 0.999·0.00025 + 0.001·0.0625 = 0.00024975 + 0.0000625 = 0.00031225
    ///   m̂ = 0.02 / (1 − 0.81) = 0.02 / 0.19 = 0.105263158
    ///   v̂ = 0.00031225 / (1 − 0.998001) = 0.00031225 / 0.001999 = 0.156203102
    ///   sqrt(v̂) = 0.395225382
    ///   p = 0.88110000198 − 0.1 · 0.105263158 / (0.395225382 + 1e-8) = 0.88110000198 − 0.026633...
    ///     = 0.854466...
    #[test]
    fn two_steps_by_hand() {
        let config = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut opt = AdamW::new(config).unwrap();
        let mut p = vec![1.0f32];
        opt.update(
            0.1,
            ParamGrad {
                name: "w",
                param: &mut p,
                grad: &[0.5],
                weight_decay: true,
            },
        )
        .unwrap();
        assert_close(p[0], 0.890000002, 1e-6, "step 1");
        let s = &opt.state().params["w"];
        assert_eq!(s.step, 1);
        assert_close(s.exp_avg[0], 0.05, 1e-9, "m1");
        assert_close(s.exp_avg_sq[0], 0.00025, 1e-10, "v1");

        opt.update(
            0.1,
            ParamGrad {
                name: "w",
                param: &mut p,
                grad: &[-0.25],
                weight_decay: true,
            },
        )
        .unwrap();
        let m_hat = 0.02f64 / 0.19;
        let v_hat = 0.00031225f64 / 0.001999;
        let expected = 0.890000002f64 * 0.99 - 0.1 * m_hat / (v_hat.sqrt() + 1e-8);
        assert!((m_hat - 0.105263158).abs() < 1e-8);
        assert!((v_hat.sqrt() - 0.395225382).abs() < 1e-8);
        assert!((expected - 0.854466).abs() < 1e-6);
        assert_close(p[0], expected, 1e-6, "step 2");
        let s = &opt.state().params["w"];
        assert_eq!(s.step, 2);
        assert_close(s.exp_avg[0], 0.02, 1e-8, "m2");
        assert_close(s.exp_avg_sq[0], 0.00031225, 1e-10, "v2");
    }

    #[test]
    fn weight_decay_flag_and_per_parameter_steps() {
        // Zero gradient: m = v = 0, so the Adam term is 0/(0 + eps) = 0 and only decay acts.
        // With the flag: p = 2 · (1 − 0.5 · 0.1) = 1.9; without: p stays 2.
        let mut opt = AdamW::new(AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        })
        .unwrap();
        let mut a = vec![2.0f32; 3];
        let mut b = vec![2.0f32; 3];
        let zeros = [0.0f32; 3];
        opt.step(
            0.5,
            [
                ParamGrad {
                    name: "a",
                    param: &mut a,
                    grad: &zeros,
                    weight_decay: true,
                },
                ParamGrad {
                    name: "b",
                    param: &mut b,
                    grad: &zeros,
                    weight_decay: false,
                },
            ],
        )
        .unwrap();
        assert_eq!(a, vec![1.9f32; 3]);
        assert_eq!(b, vec![2.0f32; 3]);
        // Only "a" gets a second update: its step is 2, "b" stays at 1.
        opt.update(
            0.5,
            ParamGrad {
                name: "a",
                param: &mut a,
                grad: &zeros,
                weight_decay: true,
            },
        )
        .unwrap();
        assert_eq!(opt.state().params["a"].step, 2);
        assert_eq!(opt.state().params["b"].step, 1);
    }

    /// The parallel path (large buffers) and the sequential path agree bit for bit, and a
    /// restored state continues exactly like the original.
    #[test]
    fn parallel_matches_sequential_and_state_round_trips() {
        let n = PARALLEL_MIN_LEN + 12_345;
        let grad: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let init: Vec<f32> = (0..n)
            .map(|i| ((i * 104729) % 997) as f32 / 997.0)
            .collect();

        let mut big = AdamW::new(AdamWConfig::default()).unwrap();
        let mut p_big = init.clone();
        big.update(
            1e-3,
            ParamGrad {
                name: "p",
                param: &mut p_big,
                grad: &grad,
                weight_decay: true,
            },
        )
        .unwrap();

        // Sequential reference: update the same numbers in small pieces (each below the
        // parallel threshold), with one optimiser per piece.
        let mut p_seq = init.clone();
        for (k, (chunk, g)) in p_seq.chunks_mut(1000).zip(grad.chunks(1000)).enumerate() {
            let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
            opt.update(
                1e-3,
                ParamGrad {
                    name: &format!("p{k}"),
                    param: chunk,
                    grad: g,
                    weight_decay: true,
                },
            )
            .unwrap();
        }
        assert_eq!(p_big, p_seq);

        // Save after one step (through JSON), restore, and take the same second step on both.
        let json = serde_json::to_string(big.state()).unwrap();
        let mut restored =
            AdamW::from_state(serde_json::from_str::<AdamWState>(&json).unwrap()).unwrap();
        assert_eq!(restored.state(), big.state());
        let mut p_restored = p_big.clone();
        for (opt, p) in [(&mut big, &mut p_big), (&mut restored, &mut p_restored)] {
            opt.update(
                1e-3,
                ParamGrad {
                    name: "p",
                    param: p,
                    grad: &grad,
                    weight_decay: true,
                },
            )
            .unwrap();
        }
        assert_eq!(p_big, p_restored);
        assert_eq!(restored.state(), big.state());
    }

    /// Twenty steps with varying gradients and learning rates against an independent f64
    /// transcription of the textbook algorithm (m̂ = m / (1 − β1^t), v̂ = v / (1 − β2^t),
    /// p ← p(1 − lr·wd) − lr · m̂ / (sqrt(v̂) + eps)).
    #[test]
    fn matches_textbook_f64_over_many_steps() {
        let config = AdamWConfig {
            beta1: 0.8,
            beta2: 0.95,
            eps: 1e-6,
            weight_decay: 0.05,
        };
        let mut opt = AdamW::new(config).unwrap();
        let n = 7;
        let mut p: Vec<f32> = (0..n).map(|i| i as f32 * 0.3 - 1.0).collect();
        let mut p64: Vec<f64> = p.iter().map(|&x| x as f64).collect();
        let (mut m64, mut v64) = (vec![0.0f64; n], vec![0.0f64; n]);
        for t in 1..=20u64 {
            let lr = 1e-2 * (1.0 + (t as f64 * 0.7).sin()) as f32;
            let grad: Vec<f32> = (0..n)
                .map(|i| ((t as f32) * 1.3 + i as f32).cos() * (1.0 + i as f32))
                .collect();
            opt.update(
                lr,
                ParamGrad {
                    name: "p",
                    param: &mut p,
                    grad: &grad,
                    weight_decay: true,
                },
            )
            .unwrap();
            let lr = lr as f64;
            for i in 0..n {
                let g = grad[i] as f64;
                p64[i] *= 1.0 - lr * config.weight_decay;
                m64[i] = config.beta1 * m64[i] + (1.0 - config.beta1) * g;
                v64[i] = config.beta2 * v64[i] + (1.0 - config.beta2) * g * g;
                let m_hat = m64[i] / (1.0 - config.beta1.powi(t as i32));
                let v_hat = v64[i] / (1.0 - config.beta2.powi(t as i32));
                p64[i] -= lr * m_hat / (v_hat.sqrt() + config.eps);
            }
        }
        for i in 0..n {
            assert_close(p[i], p64[i], 1e-5, &format!("element {i}"));
        }
    }

    /// Throughput of one update over 16 M floats (run with `--ignored --nocapture`).
    #[test]
    #[ignore]
    fn throughput() {
        let n = 16 << 20;
        let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
        let mut p = vec![0.5f32; n];
        let g = vec![0.25f32; n];
        for round in 0..3 {
            let start = std::time::Instant::now();
            opt.update(
                1e-3,
                ParamGrad {
                    name: "p",
                    param: &mut p,
                    grad: &g,
                    weight_decay: true,
                },
            )
            .unwrap();
            let s = start.elapsed().as_secs_f64();
            println!(
                "round {round}: {n} floats in {:.1} ms ({:.0} M floats/s, {} threads)",
                s * 1e3,
                n as f64 / s / 1e6,
                rayon::current_num_threads()
            );
        }
    }

    #[test]
    fn errors() {
        assert!(AdamW::new(AdamWConfig {
            beta1: 1.0,
            ..Default::default()
        })
        .is_err());
        let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
        let mut p = vec![0.0f32; 2];
        let bad_grad = ParamGrad {
            name: "p",
            param: &mut p,
            grad: &[1.0],
            weight_decay: true,
        };
        assert!(opt.update(1e-3, bad_grad).is_err());
        let mut q = vec![0.0f32; 2];
        opt.update(
            1e-3,
            ParamGrad {
                name: "q",
                param: &mut q,
                grad: &[1.0, 1.0],
                weight_decay: true,
            },
        )
        .unwrap();
        // Same name, different size: the state does not fit.
        let mut q3 = vec![0.0f32; 3];
        let err = opt
            .update(
                1e-3,
                ParamGrad {
                    name: "q",
                    param: &mut q3,
                    grad: &[1.0; 3],
                    weight_decay: true,
                },
            )
            .unwrap_err();
        assert!(err.to_string().contains("parameter q"), "{err}");
        assert!(serde_json::from_str::<AdamWConfig>(r#"{"lr":1e-3}"#).is_err());
    }
}
