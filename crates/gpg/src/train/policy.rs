//! The policy a run trains: one model type, a text stack ([`Qwen2`]) with an optional vision
//! tower ([`Tower`]: a Qwen2-VL / Qwen2.5-VL checkpoint's, with its image processor). A text
//! model is a vision-language model without a tower. Loading reads the checkpoint of the
//! [`ModelKind`] the run read once; past that, what differs is data, not code paths: a
//! prompt's images (none for a text model), the batch's optional [`ImageInputs`] (image
//! patches, `<|image_pad|>` rows, M-RoPE positions), the tower's leaves among the trained
//! ones. The trainer, SFT and the training engine call these and never ask the model's kind.
//!
//! With a tower the training step is the text step with images: the forward splices the
//! tower's embeddings into the decoder's input, and the backward carries ∂L/∂(image rows)
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
use crate::eval::vl::load_vl_items;
use crate::eval::{evaluate_on, EvalItem, Vision};
use crate::image::{load_rgb, ImageProcessor, ProcessedImage};
use crate::model::lora::{Adapter, AdapterGrads};
use crate::model::vision::{VisionGrads, VisionWeights};
#[cfg(doc)]
use crate::model::ImageInputs;
use crate::model::{
    Activations, Grads, ModelKind, Precision, Qwen2, Qwen2VL, Qwen2VLConfig, TokenLogprobs,
    TrainBatch, VlForwardCache, VlModel, VlSequence,
};
use crate::rollout::{self, Completion, PromptImages, SamplingParams};
use crate::tokenizer::Tokenizer;

use super::collective::Collective;
use super::config::TrainConfig;
use super::engine::TrainEngine;

/// The model being trained: a text stack ([`Qwen2`]) and, for a vision-language model, its
/// vision tower. A text model is a vision-language model without a tower: every pass runs the
/// decoder, and the tower (when present) adds its image embeddings at the `<|image_pad|>`
/// rows and its leaves to the trained ones.
pub struct Policy {
    /// The decoder (a vision-language model's language model).
    pub text: Qwen2,
    /// The vision tower with its image processor (`None`: a text model).
    pub tower: Option<Box<Tower>>,
}

/// A vision-language model's tower with its image processor.
pub struct Tower {
    /// The vision-language config (its `text` part is the decoder's config).
    pub config: Qwen2VLConfig,
    pub visual: VisionWeights,
    pub processor: ImageProcessor,
    /// preprocessor_config.json as read (written beside every saved copy of the model).
    preprocessor_config: Option<Vec<u8>>,
    /// Whether the tower is trained (`freeze_vision = false`): its activations are kept in the
    /// training forward and its gradients computed.
    pub train: bool,
}

/// A packed batch of (prompt, completion) sequences for the policy's forward (with the
/// images and M-RoPE tables when the policy has a tower).
pub use crate::model::Batch as PolicyBatch;

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
    /// A text model (no tower).
    pub fn from_text(text: Qwen2) -> Self {
        Policy { text, tower: None }
    }

    /// Loads a model directory of `kind` ([`ModelKind::of_dir`], read once by the run): a
    /// Qwen2-VL-family checkpoint as its decoder with its tower, a text model without one.
    pub fn load(
        dir: &Path,
        kind: ModelKind,
        device: &Device,
        precision: Precision,
        train_vision: bool,
    ) -> Result<Self> {
        if !kind.has_tower() {
            return Ok(Policy::from_text(Qwen2::load(dir, device, precision)?));
        }
        let Qwen2VL {
            config,
            text,
            visual,
        } = Qwen2VL::load(dir, device, precision)?;
        let processor = ImageProcessor::from_dir(dir)?;
        let path = dir.join("preprocessor_config.json");
        let preprocessor_config = if path.exists() {
            Some(std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?)
        } else {
            None
        };
        Ok(Policy {
            text,
            tower: Some(Box::new(Tower {
                config,
                visual,
                processor,
                preprocessor_config,
                train: train_vision,
            })),
        })
    }

    /// Whether the policy has a vision tower.
    pub fn kind(&self) -> ModelKind {
        if self.tower.is_some() {
            ModelKind::VisionLanguage
        } else {
            ModelKind::Text
        }
    }

    /// The language model (a vision-language model's decoder).
    pub fn text(&self) -> &Qwen2 {
        &self.text
    }

    pub fn text_mut(&mut self) -> &mut Qwen2 {
        &mut self.text
    }

    /// The tower, for a vision-language model.
    pub fn vision(&self) -> Option<&Tower> {
        self.tower.as_deref()
    }

    /// The decoder and the tower as one vision-language model (`None`: a text model).
    pub fn vl(&self) -> Option<VlModel<'_>> {
        self.tower.as_deref().map(|t| VlModel {
            config: &t.config,
            text: &self.text,
            visual: &t.visual,
        })
    }

    /// A decoder parameter's checkpoint name (a vision-language model's in the layout it was
    /// loaded in).
    pub fn text_name(&self, name: String) -> String {
        match &self.tower {
            None => name,
            Some(t) => t.config.text_name(&name),
        }
    }

    /// The LoRA adapter (text models only: a vision-language run refuses LoRA).
    pub fn adapter_mut(&mut self) -> Option<&mut Adapter> {
        self.text.adapter_mut()
    }

    /// Packs (prompt, completion) pairs, with the prompts' images when the policy has a tower.
    pub fn batch(&self, seqs: &[(&PreparedPrompt, &[u32])]) -> Result<PolicyBatch> {
        let Some(tower) = self.vision() else {
            let pairs: Vec<(&[u32], &[u32])> =
                seqs.iter().map(|(p, c)| (p.ids.as_slice(), *c)).collect();
            return Ok(PolicyBatch::text_only(TrainBatch::new(&pairs)?));
        };
        // Sequences of one prompt are adjacent (groups): process its images once.
        let mut images: Vec<std::rc::Rc<Vec<ProcessedImage>>> = Vec::new();
        for (i, (p, _)) in seqs.iter().enumerate() {
            if i > 0 && std::ptr::eq(*p, seqs[i - 1].0) {
                let last = images[i - 1].clone();
                images.push(last);
            } else {
                images.push(std::rc::Rc::new(tower.process_images(p)?));
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
        PolicyBatch::new(&tower.config, &vl)
    }

    /// The training forward on the host: the completion tokens' log-probs and the cache for
    /// [`Self::backward_on_host`] (the tower's activations only when `train_tower`).
    pub fn forward_on_host(
        &self,
        batch: &PolicyBatch,
        inv_temperature: f32,
        keep: Activations,
        train_tower: bool,
    ) -> Result<(TokenLogprobs, VlForwardCache)> {
        match self.vl() {
            None => {
                ensure!(
                    batch.images.is_none(),
                    "internal: an image batch for a text model"
                );
                let (lp, text) =
                    self.text
                        .forward_train_with(&batch.text, inv_temperature, keep)?;
                Ok((lp, VlForwardCache { text, vision: None }))
            }
            Some(vl) => {
                let (lp, cache) =
                    vl.forward_scored(batch, inv_temperature, Some(keep), train_tower)?;
                let cache = cache.context("internal: the training forward kept no activations")?;
                Ok((lp, cache))
            }
        }
    }

    /// Whether [`Self::forward_backward_on_host`] serves this policy: the fused pass is the
    /// text stack's (a tower's image rows take the separate backward).
    pub fn fuses_forward_backward(&self) -> bool {
        self.tower.is_none()
    }

    /// Forward and backward in one pass on the host (a policy without a tower), gradients
    /// added into the decoder's buffers, or else the adapter's.
    pub fn forward_backward_on_host(
        &self,
        batch: &PolicyBatch,
        inv_temperature: f32,
        keep: Activations,
        g: &[f32],
        decoder: Option<&mut Grads>,
        adapter: Option<&mut AdapterGrads>,
    ) -> Result<TokenLogprobs> {
        ensure!(
            self.fuses_forward_backward() && batch.images.is_none(),
            "internal: a vision-language policy takes the forward and the backward separately"
        );
        let (m, b) = (&self.text, &batch.text);
        match (decoder, adapter) {
            (Some(grads), _) => m.forward_backward_into(b, inv_temperature, keep, g, grads),
            (None, Some(grads)) => {
                m.forward_backward_adapter_into(b, inv_temperature, keep, g, grads)
            }
            (None, None) => bail!("internal: nothing of the decoder trains"),
        }
    }

    /// The backward from g_t on the host, added into the trained groups' buffers: the
    /// decoder's (or else the adapter's) and, when the forward kept them, the tower's.
    pub fn backward_on_host(
        &self,
        batch: &PolicyBatch,
        cache: VlForwardCache,
        g: &[f32],
        decoder: Option<&mut Grads>,
        adapter: Option<&mut AdapterGrads>,
        tower: Option<&mut VisionGrads>,
    ) -> Result<()> {
        let Some(vl) = self.vl() else {
            let (m, b) = (&self.text, &batch.text);
            return match (decoder, adapter) {
                (Some(d), _) => m.backward_into(b, cache.text, g, d),
                (None, Some(a)) => m.backward_adapter_into(b, cache.text, g, a),
                (None, None) => bail!("internal: nothing of the decoder trains"),
            };
        };
        let decoder = decoder.context("internal: a vision-language decoder without gradients")?;
        vl.backward_into_parts(batch, cache, g, decoder, tower)
    }

    /// Log-probs only, computed on the host (the frozen KL reference model).
    pub fn logprobs_on_host(
        &self,
        batch: &PolicyBatch,
        inv_temperature: f32,
    ) -> Result<TokenLogprobs> {
        match self.vl() {
            None => self.text.logprobs(&batch.text, inv_temperature),
            Some(vl) => vl.logprobs(batch, inv_temperature),
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
        let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
        let images = self.prompt_images(prompts)?;
        // The CPU model itself, or the CUDA decoder over the trained device weights.
        let m = &self.text;
        let engine = engine.decode_engine(m)?;
        let images = self
            .vl()
            .zip(images.as_deref())
            .map(|(model, images)| PromptImages { model, images });
        rollout::generate_on(
            m,
            &*engine,
            tokenizer,
            &ids,
            images,
            params,
            first_prompt_key,
        )
    }

    /// Each prompt's processed images when the policy has a tower (`None`: a text model).
    pub fn prompt_images(
        &self,
        prompts: &[&PreparedPrompt],
    ) -> Result<Option<Vec<Vec<ProcessedImage>>>> {
        self.vision()
            .map(|t| prompts.iter().map(|p| t.process_images(p)).collect())
            .transpose()
    }

    /// ⊕ Replaces every rank's weights (the tower's included) by rank 0's; a no-op at world 1.
    pub fn broadcast_weights(&self, collective: &dyn Collective) -> Result<()> {
        super::replica::broadcast_weights(self.text(), collective)?;
        if let Some(t) = self.vision() {
            super::replica::broadcast_tensors(&t.visual.named(), collective)?;
        }
        Ok(())
    }

    /// SHA-256 of every parameter (the tower's included), compared between ranks.
    pub fn weights_digest(&self) -> Result<[u8; 32]> {
        let Some(t) = self.vision() else {
            return super::replica::weights_digest(&self.text);
        };
        let tower: Vec<(String, &candle_core::Tensor)> = t
            .visual
            .named()
            .into_iter()
            .map(|(n, t)| (format!("visual.{n}"), t))
            .collect();
        super::replica::weights_digest_with(&self.text, &tower)
    }

    /// Writes the trained model in Hugging Face format (a vision-language model in the layout
    /// it was loaded in, with its preprocessor_config.json; a LoRA run's adapter).
    pub fn save_trained(&self, dir: &Path) -> Result<()> {
        let (Some(vl), Some(t)) = (self.vl(), self.vision()) else {
            return self.text.save_trained(dir);
        };
        vl.save_pretrained(dir)?;
        if let Some(bytes) = &t.preprocessor_config {
            crate::model::weights::write_atomic(&dir.join("preprocessor_config.json"), bytes)?;
        }
        Ok(())
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
        match (self.vl(), self.vision()) {
            (None, _) | (_, None) => super::heldout::pass_at_1_sharded(
                &self.text,
                &*engine.decode_engine(&self.text)?,
                tokenizer,
                prompts,
                samples,
                temperature,
                max_new_tokens,
                seed,
                collective,
            ),
            // Every rank evaluates every item (greedy or seeded: the same figure on each).
            (Some(vl), Some(v)) => {
                let items = prompts
                    .iter()
                    .map(Tower::eval_item)
                    .collect::<Result<Vec<_>>>()?;
                let config = super::heldout::eval_config(
                    tokenizer,
                    samples,
                    temperature,
                    max_new_tokens,
                    seed,
                );
                let vision = Vision {
                    model: vl,
                    processor: &v.processor,
                };
                let report = evaluate_on(
                    &self.text,
                    &*engine.decode_engine(&self.text)?,
                    Some(vision),
                    tokenizer,
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
        let Some(v) = self.vision() else {
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
        match self.vision() {
            None => {
                let ds = crate::data::PromptDataset::load(path, fields)?;
                crate::data::prepare_prompts(tokenizer, ds)
            }
            Some(v) => v.load_prompts(Path::new(path), fields, tokenizer),
        }
    }
}

impl Tower {
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
                let Prompt::Chat(messages) = item.prompt else {
                    bail!("{location}: an image question must be a chat");
                };
                let chat = VlChat {
                    messages,
                    images: item.images,
                };
                let (ids, _) = encode_chat(&self.config, tokenizer, &self.processor, &chat, true)
                    .with_context(|| {
                    format!("{location} (id {}): encoding the prompt", item.id)
                })?;
                Ok(PreparedPrompt {
                    record: PromptRecord {
                        id: item.id,
                        prompt: Prompt::Chat(chat.messages),
                        answer: Some(item.gold),
                        location,
                        columns: Default::default(),
                    },
                    ids,
                    images: chat.images,
                })
            })
            .collect()
    }

    /// The evaluation item of a prepared prompt (its chat, images and gold answer).
    fn eval_item(p: &PreparedPrompt) -> Result<EvalItem> {
        let Prompt::Chat(messages) = &p.record.prompt else {
            bail!("{}: an image prompt must be a chat", p.record.location);
        };
        Ok(EvalItem {
            id: p.record.id.clone(),
            prompt: Prompt::Chat(messages.clone()),
            gold: p
                .record
                .answer
                .clone()
                .with_context(|| format!("{}: no gold answer", p.record.location))?,
            images: p.images.clone(),
        })
    }
}

impl crate::checkpoint::TrainedModel for Policy {
    fn save_trained(&self, dir: &Path) -> Result<()> {
        Policy::save_trained(self, dir)
    }
}
