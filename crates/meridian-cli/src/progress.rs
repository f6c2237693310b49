//! A rollout's live progress: on a terminal, a bar per region (indicatif)
//! that fills step by step; otherwise (a pipe, a CI log) one plain line per
//! step, the same as `meridian rollout status` prints.

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use meridian_control::rollout::StepOutcome;
use std::io::IsTerminal;
use std::time::Duration;

pub enum Progress {
    Lines,
    Bars {
        multi: MultiProgress,
        /// Until the first step: the compile, shipping and installs.
        waiting: ProgressBar,
        regions: Vec<(String, ProgressBar)>,
        /// Steps a region takes: the smoke tests (if any) and each traffic step.
        steps: u64,
    },
}

impl Progress {
    /// Bars if stderr is a terminal, else lines.
    pub fn new(manifest: &meridian_manifest::Manifest) -> Progress {
        if !std::io::stderr().is_terminal() {
            return Progress::Lines;
        }
        let multi = MultiProgress::new();
        let waiting = multi.add(ProgressBar::new_spinner());
        waiting.set_message("compiling, shipping and installing");
        waiting.enable_steady_tick(Duration::from_millis(120));
        let steps = manifest.rollout.steps.len() as u64 + u64::from(!manifest.smoke.is_empty());
        Progress::Bars { multi, waiting, regions: Vec::new(), steps }
    }

    /// Shows one step the rollout took.
    pub fn step(&mut self, st: &StepOutcome) {
        let Progress::Bars { multi, waiting, regions, steps } = self else {
            crate::commands::rollout::print_step(st);
            return;
        };
        waiting.finish_and_clear();
        let bar = match regions.iter().find(|(r, _)| *r == st.region) {
            Some((_, b)) => b.clone(),
            None => {
                let b = multi.add(ProgressBar::new(*steps));
                let style = ProgressStyle::with_template("  {prefix:<16} [{bar:24}] {pos}/{len}  {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> ");
                b.set_style(style);
                b.set_prefix(st.region.clone());
                regions.push((st.region.clone(), b.clone()));
                b
            }
        };
        let detail = if st.detail.is_empty() { String::new() } else { format!(": {}", st.detail) };
        if st.step == "rollback" {
            bar.abandon_with_message(format!("rolled back{detail}"));
        } else if !st.ok {
            bar.abandon_with_message(format!("{} FAILED +{} ms{detail}", st.step, st.at_ms));
        } else {
            bar.inc(1);
            if bar.position() >= *steps {
                bar.finish_with_message(format!("active, +{} ms", st.at_ms));
            } else {
                bar.set_message(format!("{} ok, +{} ms{detail}", st.step, st.at_ms));
            }
        }
    }

    /// Leaves the bars as they are, and the terminal to what follows.
    pub fn finish(&mut self) {
        if let Progress::Bars { waiting, regions, .. } = self {
            waiting.finish_and_clear();
            for (_, b) in regions.iter() {
                if !b.is_finished() {
                    b.abandon();
                }
            }
        }
    }
}
