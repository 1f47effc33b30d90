//! The vision-language path against transformers (tests/fixtures/qwen2_vl, made by the scripts
//! there): the image processor's pixel_values bit for bit, and the tiny Qwen2-VL / Qwen2.5-VL
//! models' log-probs, greedy tokens and gradients.

use std::path::PathBuf;

use gpg::candle_core::{safetensors, Device};
use gpg::image::{load_rgb, ImageProcessor};

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/qwen2_vl")
        .join(name)
}

#[test]
fn image_processor_matches_transformers_bit_for_bit() {
    let dir = fixture_dir("images");
    let processor = ImageProcessor::from_dir(&dir).unwrap();
    let expected =
        safetensors::load(dir.join("expected_pixel_values.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<String> = expected
        .keys()
        .filter_map(|k| k.strip_suffix(".pixel_values").map(str::to_string))
        .collect();
    names.sort();
    assert!(names.len() >= 10, "{names:?}");
    for name in &names {
        let img = load_rgb(&dir.join(format!("{name}.png"))).unwrap();
        let out = processor.process(&img).unwrap();
        let grid: Vec<i64> = expected[&format!("{name}.grid_thw")].to_vec1().unwrap();
        let grid: Vec<usize> = grid.iter().map(|&g| g as usize).collect();
        assert_eq!(out.grid_thw.to_vec(), grid, "{name}: grid_thw");
        let want: Vec<f32> = expected[&format!("{name}.pixel_values")]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(out.pixel_values.len(), want.len(), "{name}: length");
        let mismatches = out
            .pixel_values
            .iter()
            .zip(&want)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        let first = out
            .pixel_values
            .iter()
            .zip(&want)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        assert_eq!(
            mismatches,
            0,
            "{name}: {mismatches} of {} values differ (first at {first:?})",
            want.len()
        );
    }
}

use gpg::candle_core::Tensor;
use gpg::image::ProcessedImage;
use gpg::model::{Batch, Precision, Qwen2VL, VlSequence};
use serde_json::Value;

mod fixture_json;
use fixture_json::{floats, ids};

const VL_MODELS: [&str; 2] = ["tiny_qwen2_vl", "tiny_qwen2_5_vl"];

struct Case {
    images: Vec<ProcessedImage>,
    prompt: Vec<u32>,
    completion: Vec<u32>,
    /// transformers' log-probs with the model in f64.
    logprobs: Vec<f32>,
    /// transformers' log-probs in f32.
    logprobs_f32: Vec<f32>,
    g: Vec<f32>,
    greedy: Vec<u32>,
}

fn cases(name: &str) -> Vec<Case> {
    let dir = fixture_dir(name);
    let processor = ImageProcessor::from_dir(&dir).unwrap();
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let images: Vec<ProcessedImage> = c["images"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| {
                    let img = load_rgb(&fixture_dir("images").join(f.as_str().unwrap())).unwrap();
                    processor.process(&img).unwrap()
                })
                .collect();
            let grids: Vec<Vec<usize>> = images.iter().map(|i| i.grid_thw.to_vec()).collect();
            let want: Vec<Vec<usize>> = c["image_grid_thw"]
                .as_array()
                .unwrap()
                .iter()
                .map(|g| ids(g).into_iter().map(|x| x as usize).collect())
                .collect();
            assert_eq!(grids, want, "{name}: image grids");
            Case {
                images,
                prompt: ids(&c["prompt_ids"]),
                completion: ids(&c["completion_ids"]),
                logprobs: floats(&c["logprobs"]),
                logprobs_f32: floats(&c["logprobs_f32"]),
                g: floats(&c["g"]),
                greedy: ids(&c["greedy_ids"]),
            }
        })
        .collect()
}

fn batch(model: &Qwen2VL, cases: &[Case]) -> Batch {
    let seqs: Vec<VlSequence<'_>> = cases
        .iter()
        .map(|c| VlSequence {
            prompt: &c.prompt,
            completion: &c.completion,
            images: &c.images,
        })
        .collect();
    Batch::new(&model.config, &seqs).unwrap()
}

#[test]
fn vl_logprobs_match_transformers_within_1e_4() {
    for name in VL_MODELS {
        let model = Qwen2VL::load(&fixture_dir(name), &Device::Cpu, Precision::F32).unwrap();
        let cases = cases(name);
        assert_eq!(
            cases.iter().map(|c| c.images.len()).collect::<Vec<_>>(),
            [1, 2, 0]
        );
        // All cases packed in one batch (images of different sequences side by side).
        let out = model.logprobs(&batch(&model, &cases), 1.0).unwrap();
        let want: Vec<f32> = cases.iter().flat_map(|c| c.logprobs.clone()).collect();
        let worst = out
            .logprobs
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        // For information: the gap to transformers' own f32 run, which is itself up to ~4e-5
        // from f64 on the most sensitive token.
        let want_f32: Vec<f32> = cases.iter().flat_map(|c| c.logprobs_f32.clone()).collect();
        let worst_f32 = out
            .logprobs
            .iter()
            .zip(&want_f32)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        eprintln!("{name}: worst |logp gap| {worst:e} to transformers in f64, {worst_f32:e} to its f32 run");
        assert!(worst < 1e-4, "{name}: worst |logp gap| {worst:e}");
    }
}

#[test]
fn vl_gradients_match_pytorch_within_1e_3_relative_including_the_vision_tower() {
    for name in VL_MODELS {
        let dir = fixture_dir(name);
        let model = Qwen2VL::load(&dir, &Device::Cpu, Precision::F32).unwrap();
        let cases = cases(name);
        let b = batch(&model, &cases);
        let g: Vec<f32> = cases.iter().flat_map(|c| c.g.clone()).collect();
        let (_, cache) = model
            .forward_scored(&b, 1.0, Some(gpg::model::Activations::All), true)
            .unwrap();
        let mut grads = model.zero_grads(false).unwrap();
        model
            .backward_into(&b, cache.unwrap(), &g, &mut grads)
            .unwrap();
        let expected =
            safetensors::load(dir.join("expected_grads.safetensors"), &Device::Cpu).unwrap();
        let named = model.named_grads(&grads);
        assert_eq!(
            named.len(),
            expected.len(),
            "{name}: number of gradient tensors"
        );
        let mut vision = 0;
        let mut worst = 0.0f64;
        for (pname, got) in named {
            let want: &Tensor = expected
                .get(&pname)
                .unwrap_or_else(|| panic!("{name}: no reference for {pname}"));
            let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(got.len(), want.len(), "{name}: {pname} size");
            let diff: f64 = got
                .iter()
                .zip(&want)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum();
            let norm: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
            let rel = (diff / norm.max(1e-30)).sqrt();
            assert!(rel < 1e-3, "{name}: {pname} relative error {rel:e}");
            worst = worst.max(rel);
            vision += pname.contains("visual.") as usize;
        }
        assert!(vision > 10, "{name}: {vision} vision gradients checked");
        eprintln!("{name}: worst gradient relative error {worst:e} ({vision} vision tensors)");
    }
}

#[test]
fn vl_checkpoint_saves_back_in_its_own_layout() {
    for name in VL_MODELS {
        let dir = fixture_dir(name);
        let model = Qwen2VL::load(&dir, &Device::Cpu, Precision::F32).unwrap();
        let out = tempfile::tempdir().unwrap();
        model.save_pretrained(out.path()).unwrap();
        let a = safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
        let b = safetensors::load(out.path().join("model.safetensors"), &Device::Cpu).unwrap();
        let mut ka: Vec<_> = a.keys().collect();
        let mut kb: Vec<_> = b.keys().collect();
        ka.sort();
        kb.sort();
        assert_eq!(ka, kb, "{name}: tensor names");
        for (k, t) in &a {
            assert_eq!(t.dims(), b[k].dims(), "{name}: {k} shape");
            let d: f32 = (t - &b[k])
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert_eq!(d, 0.0, "{name}: {k} values");
        }
        let again = Qwen2VL::load(out.path(), &Device::Cpu, Precision::F32).unwrap();
        assert_eq!(again.config.layout, model.config.layout);
    }
}

#[test]
fn vl_greedy_tokens_match_transformers() {
    use gpg::rollout::{generate_vl, SamplingParams};
    use gpg::tokenizer::Tokenizer;
    for name in VL_MODELS {
        let dir = fixture_dir(name);
        let model = Qwen2VL::load(&dir, &Device::Cpu, Precision::F32).unwrap();
        let tokenizer = Tokenizer::from_dir(&dir).unwrap();
        let cases = cases(name);
        let prompts: Vec<(Vec<u32>, Vec<ProcessedImage>)> = cases
            .iter()
            .map(|c| (c.prompt.clone(), c.images.clone()))
            .collect();
        let params = SamplingParams {
            temperature: 0.0,
            max_new_tokens: 6,
            ..SamplingParams::default()
        };
        let out = generate_vl(&model, &tokenizer, &prompts, &params).unwrap();
        for (c, o) in cases.iter().zip(&out) {
            // transformers ran without an EOS; ours stops at the first one, included.
            let end = c
                .greedy
                .iter()
                .position(|&t| t == 100)
                .map_or(c.greedy.len(), |p| p + 1);
            assert_eq!(o.token_ids, c.greedy[..end], "{name}: greedy tokens");
        }
    }
}

#[test]
fn frozen_vision_tower_gets_no_gradient_and_text_gradients_are_unchanged() {
    let name = "tiny_qwen2_5_vl";
    let model = Qwen2VL::load(&fixture_dir(name), &Device::Cpu, Precision::F32).unwrap();
    let cases = cases(name);
    let b = batch(&model, &cases);
    let g: Vec<f32> = cases.iter().flat_map(|c| c.g.clone()).collect();
    let run = |freeze: bool| {
        let (_, cache) = model
            .forward_scored(&b, 1.0, Some(gpg::model::Activations::All), !freeze)
            .unwrap();
        let mut grads = model.zero_grads(freeze).unwrap();
        model
            .backward_into(&b, cache.unwrap(), &g, &mut grads)
            .unwrap();
        grads
    };
    let (frozen, full) = (run(true), run(false));
    assert!(frozen.visual.is_none());
    assert_eq!(
        frozen.text, full.text,
        "text gradients do not depend on freezing the tower"
    );
}

#[test]
fn bf16_vl_model_stays_close_to_f32() {
    for name in VL_MODELS {
        let model = Qwen2VL::load(&fixture_dir(name), &Device::Cpu, Precision::Bf16).unwrap();
        let cases = cases(name);
        let out = model.logprobs(&batch(&model, &cases), 1.0).unwrap();
        let want: Vec<f32> = cases.iter().flat_map(|c| c.logprobs.clone()).collect();
        let worst = out
            .logprobs
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        // bf16 weights (8 significant bits) on tiny random models: gaps of a few 0.1 at most.
        assert!(worst < 0.5, "{name}: bf16 worst |logp gap| {worst}");
    }
}

#[test]
fn broken_vl_checkpoints_give_errors_naming_the_tensor() {
    let dir = fixture_dir("tiny_qwen2_vl");
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "preprocessor_config.json"] {
        std::fs::copy(dir.join(f), tmp.path().join(f)).unwrap();
    }
    let mut tensors = safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    // A vision tensor missing.
    tensors.remove("visual.blocks.1.mlp.fc2.bias");
    safetensors::save(&tensors, tmp.path().join("model.safetensors")).unwrap();
    let err = format!(
        "{:#}",
        Qwen2VL::load(tmp.path(), &Device::Cpu, Precision::F32).unwrap_err()
    );
    assert!(err.contains("visual.blocks.1.mlp.fc2.bias"), "{err}");
    // An extra tensor the model does not use.
    let mut tensors = safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    tensors.insert(
        "visual.extra.weight".into(),
        Tensor::zeros(3, gpg::candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    safetensors::save(&tensors, tmp.path().join("model.safetensors")).unwrap();
    let err = format!(
        "{:#}",
        Qwen2VL::load(tmp.path(), &Device::Cpu, Precision::F32).unwrap_err()
    );
    assert!(err.contains("visual.extra.weight"), "{err}");
    // A config whose vision width does not match the weights.
    let config = std::fs::read_to_string(dir.join("config.json"))
        .unwrap()
        .replace("\"embed_dim\": 16", "\"embed_dim\": 8");
    std::fs::write(tmp.path().join("config.json"), config).unwrap();
    std::fs::copy(
        dir.join("model.safetensors"),
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    let err = format!(
        "{:#}",
        Qwen2VL::load(tmp.path(), &Device::Cpu, Precision::F32).unwrap_err()
    );
    assert!(err.contains("visual.patch_embed.proj.weight"), "{err}");
}
