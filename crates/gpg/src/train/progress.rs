//! The console progress bar: step, ETA and the current reward.

use indicatif::{ProgressBar, ProgressStyle};

use super::metrics::StepMetrics;

pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    pub fn new(done: u64, total: u64) -> Self {
        let bar = ProgressBar::new(total);
        bar.set_position(done);
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} step {pos}/{len} [{elapsed_precise} < {eta_precise}] {wide_bar} {msg}",
        ) {
            bar.set_style(style);
        }
        Self { bar }
    }

    pub fn update(&self, m: &StepMetrics) {
        let mut msg = format!(
            "reward {:.3} len {:.0} 1/α {:.2}",
            m.reward, m.completion_length, m.inverse_alpha
        );
        if let Some(p) = m.eval_pass_at_1 {
            msg.push_str(&format!(" eval pass@1 {:.3}", p));
        }
        self.bar.set_message(msg);
        self.bar.set_position(m.step);
    }

    /// Prints a line above the bar.
    pub fn println(&self, line: &str) {
        self.bar.println(line);
    }

    pub fn finish(self) {
        self.bar.finish();
    }
}
