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
