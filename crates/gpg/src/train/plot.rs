//! The reward / accuracy curve of a run, as a PNG (`<output_dir>/curves.png`).

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use super::metrics::StepMetrics;

static FONT: &[u8] = include_bytes!("../../../../assets/DejaVuSans.ttf");

/// Draws the batch reward per step, the accuracy reward when present, and the held-out pass@1
/// points (`eval`: (step, pass@1), step 0 = before training).
pub fn write_curves(metrics: &[StepMetrics], eval: &[(u64, f64)], path: &Path) -> Result<()> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| anyhow!("cannot load the embedded font"))?;
    let last = metrics.last().map(|m| m.step).unwrap_or(1).max(1);
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    let err =
        |e: &dyn std::fmt::Display| anyhow!("{}: cannot draw the curves: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("GPG training", ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0u64..last, 0f64..1f64)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("reward / accuracy")
        .draw()
        .map_err(|e| err(&e))?;
    let reward: Vec<(u64, f64)> = metrics
        .iter()
        .map(|m| (m.step, m.reward.clamp(0.0, 1.0)))
        .collect();
    chart
        .draw_series(LineSeries::new(reward, BLUE.mix(0.5)))
        .map_err(|e| err(&e))?
        .label("batch reward (valid groups)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    if metrics.iter().any(|m| m.rewards.get("accuracy").is_some()) {
        let acc: Vec<(u64, f64)> = metrics
            .iter()
            .filter_map(|m| m.rewards.get("accuracy").map(|a| (m.step, a)))
            .collect();
        chart
            .draw_series(LineSeries::new(acc, GREEN.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label("accuracy of all samples")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN));
    }
    if !eval.is_empty() {
        chart
            .draw_series(LineSeries::new(eval.to_vec(), RED.stroke_width(3)))
            .map_err(|e| err(&e))?
            .label("held-out pass@1")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        chart
            .draw_series(
                eval.iter()
                    .map(|&(x, y)| Circle::new((x, y), 4, RED.filled())),
            )
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png_with_the_curves() {
        let metrics: Vec<StepMetrics> = super::super::metrics::read_metrics(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src/train/testdata/metrics.jsonl"
        )))
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("curves.png");
        write_curves(&metrics, &[(0, 0.14), (10, 0.295), (20, 0.29)], &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(
            bytes.len() > 5_000,
            "an almost empty image ({} bytes)",
            bytes.len()
        );
    }
}
