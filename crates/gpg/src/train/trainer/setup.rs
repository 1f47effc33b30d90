//! Setting up a run: the recipe checked, the checkpoint to resume from chosen (rank 0), the
//! policy, tokenizer and KL reference loaded, the weights broadcast, the prompts loaded, and
//! either a fresh optimiser or the checkpoint's optimiser, master weights, data position and
//! step restored. Each part is a named function below, called in this order by
//! [`Trainer::with_collective`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::checkpoint;
use crate::data::{prompts_digest, EpochSampler, PreparedPrompt, SamplerState};
use crate::optim::AdamW;
use crate::tokenizer::Tokenizer;

use super::super::collective::{Collective, GradReduce, SingleProcess};
use super::super::comm::Comm;
use super::super::config::TrainConfig;
use super::super::device::{RunNeeds, TrainDevice};
use super::super::engine::{self, OptimizerMeta, TrainEngine};
use super::super::metrics::MetricsLog;
use super::super::policy::{check_recipe, Policy};
use super::super::reference::Reference;
use super::super::{lora_run, replica};
use super::Trainer;
use crate::model::ModelKind;

/// What a checkpoint stores besides the model and the optimiser moments.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimiser steps completed.
    pub step: u64,
    pub sampler: SamplerState,
    pub tokens_seen: u64,
    /// Prompt + completion tokens sampled so far (0 in checkpoints from before it was kept).
    #[serde(default)]
    pub num_tokens: u64,
    /// AdamW configuration and step counts (moments are in the buffers file).
    pub optimizer: OptimizerMeta,
}

/// Where a run starts: step 0 with a fresh optimiser, or a checkpoint's state.
struct StartPoint {
    step: u64,
    sampler: EpochSampler,
    engine: Box<dyn TrainEngine>,
    tokens_seen: u64,
    num_tokens: u64,
}

impl Trainer {
    /// Sets up a single-process run: loads model, tokenizer, data; resumes from the newest
    /// checkpoint in the run folder that verifies when `resume` is true.
    pub fn new(config: TrainConfig, resume: bool) -> Result<Self> {
        Self::with_collective(config, resume, Arc::new(SingleProcess))
    }

    /// Sets up this rank of a data-parallel run over `collective` (see [`Self::new`]). Rank 0
    /// alone reads the run folder (the checkpoint to resume from) and writes it; the other
    /// ranks need only the recipe's model and data. Rank 0's weights and trainer state are
    /// broadcast, so every rank starts from the same replica, whatever the world size of the
    /// run that wrote the checkpoint.
    pub fn with_collective(
        config: TrainConfig,
        resume: bool,
        collective: Arc<dyn Collective>,
    ) -> Result<Self> {
        config.validate()?;
        // The model's kind, read once from its config.json; a checkpoint resumed from has the
        // same (it was saved from this model).
        let kind = ModelKind::of_dir(&config.model);
        check_recipe(&config, kind)?;
        // What sums the gradients ([distributed] backend): chosen before anything is loaded, and
        // for NCCL every rank checks first that libnccl loads (all fail together otherwise).
        let reduce = GradReduce::select(
            config.distributed.backend,
            !config.device.is_cpu(),
            collective.world(),
        )?;
        #[cfg(feature = "cuda")]
        if reduce == GradReduce::Nccl {
            super::super::collective::nccl::check_library(&*collective)?;
        }
        // The host model lives on the CPU; on a GPU run the trained weights live on the device
        // (train/device.rs), and what the GPU path does not support is refused here.
        let train_device = TrainDevice::open_for(
            &config.device,
            RunNeeds {
                model: &config.model,
                kind,
                lora: config.lora.is_some(),
                world: collective.world(),
            },
        )?;
        let root = collective.is_root();
        collective.ensure_same(
            config.to_toml()?.as_bytes(),
            "the recipe (after --set overrides)",
        )?;
        // Rank 0 chooses the checkpoint; every rank learns the verdict (and fails with it).
        let resume_from = agree(&*collective, || {
            choose_checkpoint(&config.output_dir, resume)
        })?;
        // Only rank 0 reads the checkpoint's weights; the others receive them below.
        let (mut model, model_dir) =
            load_policy(&config, kind, resume_from.as_deref().filter(|_| root))?;
        let mut tokenizer = Tokenizer::from_dir(&model_dir)?;
        tokenizer.set_chat_template_kwargs(config.data.chat_template_kwargs.clone());
        let reference = Reference::load(&config, &model, &train_device)?;
        let comm = Comm::new(collective.clone());
        comm.timed(|| model.broadcast_weights(&*collective))?;
        comm.timed(|| replica::broadcast_adapter(model.text(), &*collective))?;
        let tools = match &config.tools {
            Some(t) => {
                ensure!(
                    model.vision().is_none(),
                    "[tools]: multi-turn rollouts with tools run on text models only so far"
                );
                Some(crate::tools::Toolbox::new(t, &tokenizer)?)
            }
            None => None,
        };
        let (mut prompts, mut heldout) = model.load_prompts(&config, &tokenizer)?;
        if let Some(tools) = &tools {
            // Chat prompts list the tools (the chat template's `tools`).
            let schemas = tools.schemas();
            for p in prompts.iter_mut().chain(heldout.iter_mut().flatten()) {
                p.ids =
                    crate::tools::encode_prompt_with_tools(&tokenizer, &p.record.prompt, &schemas)?;
            }
        }
        collective.ensure_same(
            &prompts_digest(&prompts),
            "the training prompts (data.train)",
        )?;
        let reward = config.reward.build()?;
        let schedule = config.optim.schedule.build(config.optim.lr, config.steps)?;
        let mut start = match &resume_from {
            None => StartPoint {
                step: 0,
                sampler: EpochSampler::weighted(
                    prompts.len(),
                    config.seed,
                    config.data.sample_strategy,
                )?,
                engine: engine::engine_for(&train_device, &model, AdamW::new(config.optim.adamw)?)?,
                tokens_seen: 0,
                num_tokens: 0,
            },
            Some(dir) => restore(
                dir,
                &comm,
                &mut model,
                &train_device,
                &config,
                prompts.len(),
            )?,
        };
        let reduced_by = start.engine.prepare_all_reduce(reduce, &collective)?;
        if root && collective.world() > 1 {
            eprintln!(
                "[distributed] backend = \"{}\": gradients summed by {reduced_by}",
                config.distributed.backend
            );
        }
        let log = if root {
            Some(open_run_folder(&config, start.step)?)
        } else {
            None
        };
        let mut eval_prompts = load_eval_prompts(&config, &model, heldout.as_deref(), &tokenizer)?;
        if let Some(tools) = &tools {
            let schemas = tools.schemas();
            for p in eval_prompts.iter_mut().flatten() {
                p.ids =
                    crate::tools::encode_prompt_with_tools(&tokenizer, &p.record.prompt, &schemas)?;
            }
        }
        let trainer = Self {
            config,
            model,
            tokenizer,
            prompts,
            heldout,
            sampler: start.sampler,
            reward,
            engine: start.engine,
            schedule,
            step: start.step,
            tokens_seen: start.tokens_seen,
            num_tokens: start.num_tokens,
            log,
            comm,
            eval_prompts,
            reference,
            stop: None,
            tools,
        };
        trainer.check_replicas()?;
        Ok(trainer)
    }
}

/// Rank 0's choice of the checkpoint to resume from (`None`: a fresh run), refusing a fresh
/// run in a folder that already holds one and a `--resume` with nothing to resume.
fn choose_checkpoint(out: &Path, resume: bool) -> Result<Option<PathBuf>> {
    if !resume {
        if out.join("metrics.jsonl").exists() {
            bail!(
                "{}: the run folder already holds a run (metrics.jsonl); pass --resume to continue it or choose another output_dir",
                out.display()
            );
        }
        return Ok(None);
    }
    let Some(found) = checkpoint::latest_verified(out)? else {
        bail!(
            "{}: --resume given but the run folder holds no checkpoint-<step> directory",
            out.display()
        );
    };
    for (dir, why) in &found.skipped {
        eprintln!("--resume: skipping {}: {why}", dir.display());
    }
    match found.integrity {
        checkpoint::Integrity::Verified => eprintln!(
            "--resume: continuing from {} (step {}, every file matches its manifest)",
            found.dir.display(),
            found.step
        ),
        checkpoint::Integrity::Unverified => eprintln!(
            "--resume: continuing from {} (step {}; it has no {} to verify against)",
            found.dir.display(),
            found.step,
            checkpoint::MANIFEST
        ),
    }
    Ok(Some(found.dir))
}

/// The policy to train, from the recipe's model or (`checkpoint`) the checkpoint resumed from,
/// with its LoRA adapter attached; returns it with the directory its tokenizer comes from.
/// With LoRA the base always comes from `model` and the adapter from the checkpoint.
fn load_policy(
    config: &TrainConfig,
    kind: ModelKind,
    checkpoint: Option<&Path>,
) -> Result<(Policy, PathBuf)> {
    let model_dir = checkpoint.unwrap_or(&config.model).to_path_buf();
    let weights_dir = if config.lora.is_some() {
        &config.model
    } else {
        &model_dir
    };
    let mut model = Policy::load(
        weights_dir,
        kind,
        &candle_core::Device::Cpu,
        config.precision,
        !config.freeze_vision,
    )
    .with_context(|| format!("loading the model from {}", weights_dir.display()))?;
    if let Some(n) = config.gradient_checkpointing_layers {
        let layers = model.text().config.num_hidden_layers;
        ensure!(
            n <= layers,
            "gradient_checkpointing_layers = {n}, but {} has {layers} decoder layers",
            config.model.display()
        );
    }
    if let Some(lora) = &config.lora {
        lora_run::attach_adapter(
            model.text_mut(),
            lora,
            config.seed,
            &config.model,
            checkpoint,
        )?;
    }
    Ok((model, model_dir))
}

/// The state of checkpoint `dir` (⊕ rank 0's files broadcast when there are several ranks):
/// the optimiser with its moments, the master weights, the data position and the step.
fn restore(
    dir: &Path,
    comm: &Comm,
    model: &mut Policy,
    train_device: &TrainDevice,
    config: &TrainConfig,
    n_prompts: usize,
) -> Result<StartPoint> {
    let collective = &comm.collective;
    let (state, mut buffers) = if collective.world() == 1 {
        checkpoint::load_state(dir)?
    } else {
        // ⊕ Rank 0's trainer state files, as bytes (the others may not see them).
        let (mut state, mut buffers) = if collective.is_root() {
            checkpoint::read_state_files(dir)?
        } else {
            (Vec::new(), Vec::new())
        };
        comm.timed(|| collective.broadcast_bytes(&mut state, 0))?;
        comm.timed(|| collective.broadcast_bytes(&mut buffers, 0))?;
        checkpoint::parse_state(dir, &state, &buffers)?
    };
    let state: TrainerState = serde_json::from_value(state)
        .with_context(|| format!("{}: malformed trainer state", dir.display()))?;
    let optimizer = engine::restore_optimizer(state.optimizer, &mut buffers)
        .with_context(|| format!("{}: cannot restore the optimiser", dir.display()))?;
    let mut engine = engine::engine_for(train_device, model, optimizer)?;
    engine
        .restore_master(model, &mut buffers)
        .with_context(|| format!("{}: cannot restore the master weights", dir.display()))?;
    Ok(StartPoint {
        step: state.step,
        sampler: EpochSampler::resume(state.sampler, n_prompts, config.data.sample_strategy)
            .with_context(|| format!("{}: cannot resume the prompt sampler", dir.display()))?,
        engine,
        tokens_seen: state.tokens_seen,
        num_tokens: state.num_tokens,
    })
}

/// Creates the run folder (rank 0), saves the resolved recipe in it and opens the metrics files
/// at `step`.
fn open_run_folder(config: &TrainConfig, step: u64) -> Result<MetricsLog> {
    let out = &config.output_dir;
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    std::fs::write(out.join("config.toml"), config.to_toml()?)
        .with_context(|| format!("{}: cannot write config.toml", out.display()))?;
    MetricsLog::open(out, step)
}

/// The prompts of the periodic evaluation (`[eval]`): the synthetic task's held-out split or
/// the `eval.data` file, cut to `eval.limit`.
fn load_eval_prompts(
    config: &TrainConfig,
    model: &Policy,
    heldout: Option<&[PreparedPrompt]>,
    tokenizer: &Tokenizer,
) -> Result<Option<Vec<PreparedPrompt>>> {
    let Some(e) = &config.eval else {
        return Ok(None);
    };
    let mut prompts = if e.data == "synthetic" {
        heldout
            .context("eval.data = \"synthetic\" needs data.train = \"synthetic\"")?
            .to_vec()
    } else {
        model.load_eval_prompts(&e.data, &config.data.fields, tokenizer)?
    };
    if let Some(limit) = e.limit {
        prompts.truncate(limit);
    }
    Ok(Some(prompts))
}

/// Rank 0's verdict on a decision only it can take (it alone sees the run folder), shared with
/// every rank: its value, or its error on every rank.
fn agree<T: Serialize + serde::de::DeserializeOwned>(
    collective: &dyn Collective,
    decide: impl FnOnce() -> Result<T>,
) -> Result<T> {
    if collective.world() == 1 {
        return decide();
    }
    let mut message = if collective.is_root() {
        let verdict: std::result::Result<T, String> = decide().map_err(|e| format!("{e:#}"));
        serde_json::to_vec(&verdict)?
    } else {
        Vec::new()
    };
    collective.broadcast_bytes(&mut message, 0)?;
    let verdict: std::result::Result<T, String> =
        serde_json::from_slice(&message).context("internal: rank 0's verdict")?;
    verdict.map_err(|e| {
        if collective.is_root() {
            anyhow::anyhow!(e)
        } else {
            anyhow::anyhow!("rank 0: {e}")
        }
    })
}
