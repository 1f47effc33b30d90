//! The policy a run trains: a text model ([`Qwen2`]) or a vision-language model ([`Qwen2VL`],
//! Qwen2-VL / Qwen2.5-VL). This is the one place that tells them apart: loading, the
//! prompts' data (a vision-language policy's prompts carry images), the packed training batch,
//! forward/backward, sampling, held-out accuracy and saving. The trainer and SFT call these and
//! are otherwise the same for both.
//!
//! For a vision-language policy the training step is the text step with images: the batch is
//! a [`VlBatch`] (image patches, `<|image_pad|>` rows, M-RoPE positions), the forward splices
//! the tower's embeddings into the decoder's input, and the backward carries ∂L/∂(image rows)
//! into the tower unless `freeze_vision` (then the tower keeps no activations and has no
//! gradient or optimiser state). g_t, the objective and the optimiser are the text ones.
//!
//! Not supported for vision-language policies (refused by [`check_recipe`]): LoRA and a GPU
//! device (the vision ops have no CUDA kernels yet). Data parallelism works as for text: the
//! tower's weights are broadcast and digested with the decoder's, its gradients all-reduced.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::Device;

use crate::data::vl_chat::{encode_chat, VlChat};
use crate::data::{
    Location, LongPromptPolicy, PreparedPrompt, Prompt, PromptDatasetConfig, PromptRecord,
};
use crate::eval::vl::{evaluate_vl_with_progress, load_vl_items, VlEvalItem};
use crate::image::{load_rgb, ImageProcessor, ProcessedImage};
use crate::model::lora::Adapter;
use crate::model::{
    ModelKind, Precision, Qwen2, Qwen2VL, TokenLogprobs, TrainBatch, VlBatch, VlSequence,
};
use crate::rollout::{self, Completion, SamplingParams};
use crate::tokenizer::Tokenizer;

use super::collective::Collective;
use super::config::TrainConfig;
use super::engine::TrainEngine;

/// The model being trained (one per run: the variants' sizes do not matter).
#[allow(clippy::large_enum_variant)]
pub enum Policy {
    Text(Qwen2),
    Vision(Box<VisionPolicy>),
}

/// A vision-language model with its image processor.
pub struct VisionPolicy {
    pub model: Qwen2VL,
    pub processor: ImageProcessor,
    /// preprocessor_config.json as read (written beside every saved copy of the model).
    preprocessor_config: Option<Vec<u8>>,
    /// Whether the tower is trained (`freeze_vision = false`): its activations are kept in the
    /// training forward and its gradients computed.
    pub train_vision: bool,
}

/// A packed batch of (prompt, completion) sequences for the policy's forward.
pub enum PolicyBatch {
    Text(TrainBatch),
    Vision(Box<VlBatch>),
}

impl PolicyBatch {
    pub fn num_completion_tokens(&self) -> usize {
        match self {
            PolicyBatch::Text(b) => b.num_completion_tokens(),
            PolicyBatch::Vision(b) => b.text.num_completion_tokens(),
        }
    }
}

/// Refuses, before anything is loaded, the combinations a vision-language model does not
/// support yet, saying what to do instead; and `freeze_vision` on a text model. `kind` is the
/// recipe's model's ([`ModelKind::of_dir`]).
pub fn check_recipe(config: &TrainConfig, kind: ModelKind) -> Result<()> {
    if !kind.has_tower() {
        ensure!(
            !config.freeze_vision,
            "freeze_vision = true: {} is a text model (no vision tower to freeze)",
            config.model.display()
        );
        return Ok(());
    }
    check_vision_options(&config.model, config.device.is_cpu(), config.lora.is_some())
}

/// The vision-language model's limits shared by `train` and `sft`.
pub fn check_vision_options(model: &Path, cpu: bool, lora: bool) -> Result<()> {
    let what = format!(
        "{} is a vision-language model (Qwen2-VL family)",
        model.display()
    );
    ensure!(
        cpu,
        "{what}: its vision ops run on the CPU only so far (no CUDA kernels for the tower); \
         use device = \"cpu\" (`--set device=cpu`)"
    );
    ensure!(
        !lora,
        "{what}: LoRA is supported for text models only; remove the [lora] table to fine-tune \
         every parameter (freeze_vision = true keeps the tower fixed)"
    );
    Ok(())
}

impl Policy {
    /// Loads a model directory of `kind` ([`ModelKind::of_dir`], read once by the run): a
    /// Qwen2-VL-family checkpoint as a vision-language policy, a text model as a text policy.
    pub fn load(
        dir: &Path,
        kind: ModelKind,
        device: &Device,
        precision: Precision,
        train_vision: bool,
    ) -> Result<Self> {
        if !kind.has_tower() {
            return Ok(Policy::Text(Qwen2::load(dir, device, precision)?));
        }
        let model = Qwen2VL::load(dir, device, precision)?;
        let processor = ImageProcessor::from_dir(dir)?;
        let path = dir.join("preprocessor_config.json");
        let preprocessor_config = if path.exists() {
            Some(std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?)
        } else {
            None
        };
        Ok(Policy::Vision(Box::new(VisionPolicy {
            model,
            processor,
            preprocessor_config,
            train_vision,
        })))
    }

    /// Whether the policy has a vision tower.
    pub fn kind(&self) -> ModelKind {
        match self {
            Policy::Text(_) => ModelKind::Text,
            Policy::Vision(_) => ModelKind::VisionLanguage,
        }
    }

    /// The language model (a vision-language model's decoder).
    pub fn text(&self) -> &Qwen2 {
        match self {
            Policy::Text(m) => m,
            Policy::Vision(v) => &v.model.text,
        }
    }

    pub fn text_mut(&mut self) -> &mut Qwen2 {
        match self {
            Policy::Text(m) => m,
            Policy::Vision(v) => &mut v.model.text,
        }
    }

    pub fn vision(&self) -> Option<&VisionPolicy> {
        match self {
            Policy::Text(_) => None,
            Policy::Vision(v) => Some(v),
        }
    }

    /// The LoRA adapter (text models only).
    pub fn adapter_mut(&mut self) -> Option<&mut Adapter> {
        match self {
            Policy::Text(m) => m.adapter_mut(),
            Policy::Vision(_) => None,
        }
    }

    /// Packs (prompt, completion) pairs, with the prompts' images for a vision-language policy.
    pub fn batch(&self, seqs: &[(&PreparedPrompt, &[u32])]) -> Result<PolicyBatch> {
        match self {
            Policy::Text(_) => {
                let pairs: Vec<(&[u32], &[u32])> =
                    seqs.iter().map(|(p, c)| (p.ids.as_slice(), *c)).collect();
                Ok(PolicyBatch::Text(TrainBatch::new(&pairs)?))
            }
            Policy::Vision(v) => {
                // Sequences of one prompt are adjacent (groups): process its images once.
                let mut images: Vec<std::rc::Rc<Vec<ProcessedImage>>> = Vec::new();
                for (i, (p, _)) in seqs.iter().enumerate() {
                    if i > 0 && std::ptr::eq(*p, seqs[i - 1].0) {
                        let last = images[i - 1].clone();
                        images.push(last);
                    } else {
                        images.push(std::rc::Rc::new(v.process_images(p)?));
                    }
                }
                let vl: Vec<VlSequence<'_>> = seqs
                    .iter()
                    .zip(&images)
                    .map(|((p, c), im)| VlSequence {
                        prompt: &p.ids,
                        completion: c,
                        images: im.as_slice(),
                    })
                    .collect();
                Ok(PolicyBatch::Vision(Box::new(VlBatch::new(
                    &v.model.config,
                    &vl,
                )?)))
            }
        }
    }

    /// Log-probs only, computed on the host (the frozen KL reference model).
    pub fn logprobs_on_host(
        &self,
        batch: &PolicyBatch,
        inv_temperature: f32,
    ) -> Result<TokenLogprobs> {
        match (self, batch) {
            (Policy::Text(m), PolicyBatch::Text(b)) => m.logprobs(b, inv_temperature),
            (Policy::Vision(v), PolicyBatch::Vision(b)) => v.model.logprobs(b, inv_temperature),
            _ => bail!("internal: a batch of the other kind of policy"),
        }
    }

    /// Samples `params.n` completions per prompt; prompt `i` draws from the streams of prompt
    /// `first_prompt_key + i` (see [`rollout::generate_keyed`]).
    pub fn generate(
        &self,
        engine: &dyn TrainEngine,
        tokenizer: &Tokenizer,
        prompts: &[&PreparedPrompt],
        params: &SamplingParams,
        first_prompt_key: u64,
    ) -> Result<Vec<Completion>> {
        match self {
            Policy::Text(m) => {
                let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
                // The CPU model itself, or the CUDA decoder over the trained device weights.
                let engine = engine.decode_engine(m)?;
                rollout::generate_on(m, &*engine, tokenizer, &ids, params, first_prompt_key)
            }
            Policy::Vision(v) => {
                let with_images = prompts
                    .iter()
                    .map(|p| Ok((p.ids.clone(), v.process_images(p)?)))
                    .collect::<Result<Vec<_>>>()?;
                rollout::generate_vl_keyed(
                    &v.model,
                    tokenizer,
                    &with_images,
                    params,
                    first_prompt_key,
                )
            }
        }
    }

    /// ⊕ Replaces every rank's weights (the tower's included) by rank 0's; a no-op at world 1.
    pub fn broadcast_weights(&self, collective: &dyn Collective) -> Result<()> {
        super::replica::broadcast_weights(self.text(), collective)?;
        if let Policy::Vision(v) = self {
            super::replica::broadcast_tensors(&v.model.visual.named(), collective)?;
        }
        Ok(())
    }

    /// SHA-256 of every parameter (the tower's included), compared between ranks.
    pub fn weights_digest(&self) -> Result<[u8; 32]> {
        match self {
            Policy::Text(m) => super::replica::weights_digest(m),
            Policy::Vision(v) => {
                let tower: Vec<(String, &candle_core::Tensor)> = v
                    .model
                    .visual
                    .named()
                    .into_iter()
                    .map(|(n, t)| (format!("visual.{n}"), t))
                    .collect();
                super::replica::weights_digest_with(&v.model.text, &tower)
            }
        }
    }

    /// Writes the trained model in Hugging Face format (a vision-language model in the layout
    /// it was loaded in, with its preprocessor_config.json; a LoRA run's adapter).
    pub fn save_trained(&self, dir: &Path) -> Result<()> {
        match self {
            Policy::Text(m) => m.save_trained(dir),
            Policy::Vision(v) => {
                v.model.save_pretrained(dir)?;
                if let Some(bytes) = &v.preprocessor_config {
                    crate::model::weights::write_atomic(
                        &dir.join("preprocessor_config.json"),
                        bytes,
                    )?;
                }
                Ok(())
            }
        }
    }

    /// Held-out pass@1 (the mean over prompts and `samples` completions of the task's
    /// accuracy): mathematical equivalence for text prompts (sharded over ranks), visual
    /// accuracy for image questions.
    #[allow(clippy::too_many_arguments)]
    pub fn heldout_pass_at_1(
        &self,
        engine: &dyn TrainEngine,
        tokenizer: &Tokenizer,
        prompts: &[PreparedPrompt],
        samples: usize,
        temperature: f32,
        max_new_tokens: usize,
        seed: u64,
        collective: &dyn Collective,
    ) -> Result<f64> {
        match self {
            Policy::Text(m) => super::heldout::pass_at_1_sharded(
                m,
                &*engine.decode_engine(m)?,
                tokenizer,
                prompts,
                samples,
                temperature,
                max_new_tokens,
                seed,
                collective,
            ),
            // Every rank evaluates every item (greedy or seeded: the same figure on each).
            Policy::Vision(v) => {
                let items = prompts
                    .iter()
                    .map(VisionPolicy::eval_item)
                    .collect::<Result<Vec<_>>>()?;
                let config = super::heldout::eval_config(
                    tokenizer,
                    samples,
                    temperature,
                    max_new_tokens,
                    seed,
                );
                let report = evaluate_vl_with_progress(
                    &v.model,
                    tokenizer,
                    &v.processor,
                    &items,
                    &config,
                    &mut |_, _| Ok(()),
                )?;
                Ok(report.summary.pass_at_1)
            }
        }
    }

    /// The training prompts (and the synthetic task's held-out split) of the recipe.
    pub fn load_prompts(
        &self,
        config: &TrainConfig,
        tokenizer: &Tokenizer,
    ) -> Result<(Vec<PreparedPrompt>, Option<Vec<PreparedPrompt>>)> {
        let Policy::Vision(v) = self else {
            return crate::data::load_prompts(&config.data, tokenizer);
        };
        let data = &config.data;
        ensure!(
            data.train != "synthetic",
            "data.train = \"synthetic\": the built-in task is text-only; a vision-language model \
             trains on a JSONL file of image questions"
        );
        let mut prompts = v.load_prompts(Path::new(&data.train), &data.fields, tokenizer)?;
        let before = prompts.len();
        if let Some(long) = prompts
            .iter()
            .find(|p| p.ids.len() > data.max_prompt_tokens)
        {
            if data.long_prompts == LongPromptPolicy::Error {
                bail!(
                    "{}: prompt has {} tokens (image tokens included), more than the maximum \
                     prompt length {}",
                    long.record.location,
                    long.ids.len(),
                    data.max_prompt_tokens
                );
            }
        }
        prompts.retain(|p| p.ids.len() <= data.max_prompt_tokens);
        if prompts.len() < before {
            eprintln!(
                "dropped {} prompts longer than {} tokens from {}",
                before - prompts.len(),
                data.max_prompt_tokens,
                data.train
            );
        }
        ensure!(
            !prompts.is_empty(),
            "{}: no prompt left after dropping those longer than {} tokens",
            data.train,
            data.max_prompt_tokens
        );
        Ok((prompts, None))
    }

    /// The prompts of a held-out evaluation file (`eval.data`).
    pub fn load_eval_prompts(
        &self,
        path: &str,
        fields: &PromptDatasetConfig,
        tokenizer: &Tokenizer,
    ) -> Result<Vec<PreparedPrompt>> {
        match self {
            Policy::Text(_) => {
                let ds = crate::data::PromptDataset::load(path, fields)?;
                crate::data::prepare_prompts(tokenizer, ds)
            }
            Policy::Vision(v) => v.load_prompts(Path::new(path), fields, tokenizer),
        }
    }
}

impl VisionPolicy {
    /// The processed images of a prompt, in order.
    pub fn process_images(&self, prompt: &PreparedPrompt) -> Result<Vec<ProcessedImage>> {
        prompt
            .images
            .iter()
            .map(|p| {
                self.processor
                    .process(&load_rgb(p)?)
                    .with_context(|| format!("{}: {}", prompt.record.location, p.display()))
            })
            .collect()
    }

    /// Reads image questions (the `eval --benchmark` line format, [`crate::eval::vl`]): chat
    /// `messages` with image parts, or `problem`/`question`/`prompt` with `image`/`images`;
    /// the gold answer in `answer`/`solution`; image paths relative to the file. Each prompt is
    /// rendered by the chat template with the generation prompt and its pads expanded.
    pub fn load_prompts(
        &self,
        path: &Path,
        fields: &PromptDatasetConfig,
        tokenizer: &Tokenizer,
    ) -> Result<Vec<PreparedPrompt>> {
        for (key, value) in [
            ("prompt_field", &fields.prompt_field),
            ("answer_field", &fields.answer_field),
            ("id_field", &fields.id_field),
        ] {
            ensure!(
                value.is_none(),
                "data.fields.{key}: image datasets read fixed fields (`messages`, or \
                 `problem`/`question`/`prompt` with `image`/`images`; `answer`/`solution`; `id`)"
            );
        }
        ensure!(
            fields.apply_chat_template,
            "data.fields.apply_chat_template = false: image prompts are always rendered by the \
             model's chat template"
        );
        let items = load_vl_items(path, fields.system_prompt.as_deref())?;
        let file = path.display().to_string();
        items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                let location = Location::new(file.clone(), "item", i + 1);
                let (ids, _) = encode_chat(
                    &self.model.config,
                    tokenizer,
                    &self.processor,
                    &item.chat,
                    true,
                )
                .with_context(|| format!("{location} (id {}): encoding the prompt", item.id))?;
                Ok(PreparedPrompt {
                    record: PromptRecord {
                        id: item.id,
                        prompt: Prompt::Chat(item.chat.messages),
                        answer: Some(item.gold),
                        location,
                        columns: Default::default(),
                    },
                    ids,
                    images: item.chat.images,
                })
            })
            .collect()
    }

    /// The evaluation item of a prepared prompt (its chat, images and gold answer).
    fn eval_item(p: &PreparedPrompt) -> Result<VlEvalItem> {
        let Prompt::Chat(messages) = &p.record.prompt else {
            bail!("{}: an image prompt must be a chat", p.record.location);
        };
        Ok(VlEvalItem {
            id: p.record.id.clone(),
            chat: VlChat {
                messages: messages.clone(),
                images: p.images.clone(),
            },
            gold: p
                .record
                .answer
                .clone()
                .with_context(|| format!("{}: no gold answer", p.record.location))?,
        })
    }
}

impl crate::checkpoint::TrainedModel for Policy {
    fn save_trained(&self, dir: &Path) -> Result<()> {
        Policy::save_trained(self, dir)
    }
}
