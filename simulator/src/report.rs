//! The run report: JSON for machines, a text summary for people.

use std::collections::BTreeMap;
use std::path::Path;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::ceiling::Ceiling;
use crate::verify::Verification;

/// Latency summary of one phase, microseconds.
#[derive(Debug, Serialize)]
pub struct PhaseLatency {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Maximum.
    pub max_us: u64,
}

impl PhaseLatency {
    /// Summarizes a histogram.
    pub fn of(h: &Histogram<u64>) -> Self {
        PhaseLatency {
            count: h.len(),
            mean_us: h.mean(),
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

/// Memory and CPU of one process.
#[derive(Debug, Serialize)]
pub struct Usage {
    /// Peak resident set (VmHWM), bytes.
    pub peak_memory_bytes: u64,
    /// User + system CPU, seconds.
    pub cpu_seconds: f64,
}

/// Memory, CPU and restarts of one embedded CA node.
#[derive(Debug, Clone, Serialize)]
pub struct NodeUsage {
    /// Its `--node-id`.
    pub node: String,
    /// Peak resident set (VmHWM) of its largest incarnation, bytes.
    pub peak_memory_bytes: u64,
    /// User + system CPU of all its incarnations, seconds.
    pub cpu_seconds: f64,
    /// Times it was killed with SIGKILL and restarted.
    pub restarts: u64,
}

/// Time and memory of the verification pass (in the simulator process).
#[derive(Debug, Serialize)]
pub struct PassUsage {
    /// Wall time, seconds.
    pub seconds: f64,
    /// The simulator process's peak resident set (VmHWM) while the pass ran, bytes: what the
    /// process held when the pass began (the devices' certificate digests among it) and what
    /// the pass added.
    pub peak_memory_bytes: u64,
    /// Whether the kernel's peak was reset just before the pass; when it could not be, the
    /// figure is the whole process's peak, device phases included.
    pub peak_reset_before_pass: bool,
}

/// The whole report.
#[derive(Debug, Serialize)]
pub struct Report {
    /// What was run.
    pub config: BTreeMap<String, String>,
    /// Wall time of the device phase, seconds.
    pub wall_seconds: f64,
    /// Devices through every phase.
    pub devices_ok: u64,
    /// Devices that failed.
    pub devices_failed: u64,
    /// devices_ok / wall_seconds.
    pub devices_per_second: f64,
    /// (seconds since start, devices done) once a second.
    pub throughput: Vec<(f64, u64)>,
    /// Latency per phase.
    pub phases: BTreeMap<String, PhaseLatency>,
    /// Failures by kind.
    pub errors: BTreeMap<String, u64>,
    /// This machine's crypto ceiling.
    pub ceiling: Ceiling,
    /// devices_per_second / ceiling.devices_per_second.
    pub fraction_of_ceiling: f64,
    /// The simulator process during the device phases (before the verification pass).
    pub simulator: Usage,
    /// The CA: its one process, or with several nodes their largest peak and their CPU
    /// together (null: not measured, the CA runs elsewhere).
    pub ca: Option<Usage>,
    /// Each embedded CA node (empty: the CA runs elsewhere).
    pub ca_nodes: Vec<NodeUsage>,
    /// Store size on disk, bytes (null: not measured, the CA runs elsewhere).
    pub store_bytes: Option<u64>,
    /// Times the CA was killed with SIGKILL and restarted during the run.
    pub ca_restarts: u64,
    /// Store bytes per device record (null: not measured, the CA runs elsewhere).
    pub store_bytes_per_device: Option<f64>,
    /// The verification pass.
    pub verification: Verification,
    /// Time and memory of the verification pass.
    pub verification_pass: PassUsage,
    /// Workers that stopped before the devices ran out (no socket, a panic).
    pub worker_faults: Vec<String>,
    /// Whether the run did what it was asked; the exit status follows it.
    pub verdict: Verdict,
}

/// Whether a run did what it was asked: every one of `--devices` through every phase, no
/// worker lost, and the verification pass passed. The simulator exits 0 only then.
#[derive(Debug, Serialize)]
pub struct Verdict {
    /// All of the above held.
    pub passed: bool,
    /// What did not hold, for people (empty when passed).
    pub reasons: Vec<String>,
}

impl Verdict {
    /// The verdict on a run of `devices` of which `done` went through every phase.
    pub fn of(
        devices: u64,
        done: u64,
        errors: &BTreeMap<String, u64>,
        worker_faults: &[String],
        verification: &Verification,
    ) -> Self {
        let mut reasons = Vec::new();
        if done != devices {
            let kinds: Vec<String> = errors.iter().map(|(k, n)| format!("{k} {n}")).collect();
            reasons.push(format!(
                "{done} of {devices} devices completed (failures: {})",
                if kinds.is_empty() {
                    "none recorded".to_string()
                } else {
                    kinds.join(", ")
                }
            ));
        }
        if let Some(first) = worker_faults.first() {
            reasons.push(format!(
                "{} worker(s) stopped early, first: {first}",
                worker_faults.len()
            ));
        }
        if !verification.ok() {
            reasons.push("the verification pass found problems".to_string());
        }
        Verdict {
            passed: reasons.is_empty(),
            reasons,
        }
    }

    /// `PASSED` or `FAILED`.
    pub fn word(&self) -> &'static str {
        if self.passed { "PASSED" } else { "FAILED" }
    }
}

impl Report {
    /// Writes `report.json` and `report.html` in `dir`; returns the HTML page's path.
    pub fn write(&self, dir: &Path) -> Result<std::path::PathBuf, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.join("report.json");
        let text = serde_json::to_vec_pretty(self).map_err(|e| e.to_string())?;
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        let html = dir.join("report.html");
        std::fs::write(&html, crate::html::render(self)?)
            .map_err(|e| format!("{}: {e}", html.display()))?;
        Ok(html)
    }

    /// A few lines for the terminal.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let mb = |b: u64| b as f64 / (1024.0 * 1024.0);
        s += &format!(
            "devices: {} ok, {} failed in {:.1} s = {:.0} devices/s ({:.0}% of this machine's crypto ceiling of {:.0}/s)\n",
            self.devices_ok,
            self.devices_failed,
            self.wall_seconds,
            self.devices_per_second,
            self.fraction_of_ceiling * 100.0,
            self.ceiling.devices_per_second
        );
        s += &format!(
            "  ceiling: {:.0} us of crypto per device on one core (TLS handshakes {:.0} us of it), {} cores; timed in {}\n",
            self.ceiling.per_device_us,
            self.ceiling.https_handshake_us + self.ceiling.mtls_handshake_us,
            self.ceiling.cores,
            self.ceiling.clock.describe()
        );
        for (name, p) in &self.phases {
            s += &format!(
                "  {name:<8} p50 {:>7} us  p99 {:>7} us  max {:>8} us\n",
                p.p50_us, p.p99_us, p.max_us
            );
        }
        if !self.errors.is_empty() {
            s += &format!("errors: {:?}\n", self.errors);
        }
        let ca = match &self.ca {
            Some(ca) => format!(
                "peak memory {:.1} MiB, CPU {:.1} s",
                mb(ca.peak_memory_bytes),
                ca.cpu_seconds
            ),
            None => NOT_MEASURED.to_string(),
        };
        s += &format!(
            "CA: {ca}; simulator (device phases): peak memory {:.1} MiB, CPU {:.1} s\n",
            mb(self.simulator.peak_memory_bytes),
            self.simulator.cpu_seconds
        );
        if self.ca_nodes.len() > 1 {
            for n in &self.ca_nodes {
                s += &format!(
                    "  node {}: peak memory {:.1} MiB, CPU {:.1} s ({:.0} us per device done), restarted {} times\n",
                    n.node,
                    mb(n.peak_memory_bytes),
                    n.cpu_seconds,
                    n.cpu_seconds * 1e6 / self.devices_ok.max(1) as f64,
                    n.restarts
                );
            }
        }
        s += &format!("verification pass: {}\n", self.pass_text());
        if self.ca_restarts > 0 {
            s += &format!(
                "CA killed with SIGKILL and restarted {} times\n",
                self.ca_restarts
            );
        }
        s += &format!("store: {}\n", self.store_text());
        let v = &self.verification;
        s += &format!(
            "verification: {} ({}) — {}\n",
            self.verification_word(),
            v.label(),
            v.figures()
        );
        for p in v.problems() {
            s += &format!("  problem: {p}\n");
        }
        for f in &self.worker_faults {
            s += &format!("  worker fault: {f}\n");
        }
        s += &format!("result: {}", self.verdict.word());
        if self.verdict.passed {
            s += &format!(
                ": all {} devices completed and the verification pass passed\n",
                self.devices_ok
            );
        } else {
            s += &format!(": {}\n", self.verdict.reasons.join("; "));
        }
        s
    }

    /// The verification pass's verdict in words that cannot be read as the run's: `PASSED`
    /// only when the whole run passed; a pass over a run that failed only "checked" what
    /// completed.
    pub fn verification_word(&self) -> String {
        match (self.verification.ok(), self.verdict.passed) {
            (false, _) => "FAILED".into(),
            (true, true) => "PASSED".into(),
            (true, false) => format!(
                "no problem found in the {} devices that completed, but the run FAILED",
                self.devices_ok
            ),
        }
    }
}

/// What the report says of a figure it could not measure.
pub const NOT_MEASURED: &str = "not measured: remote CA";

impl Report {
    /// The verification pass's time and memory, for people.
    pub fn pass_text(&self) -> String {
        let p = &self.verification_pass;
        format!(
            "{:.1} s, peak memory {:.1} MiB ({})",
            p.seconds,
            p.peak_memory_bytes as f64 / (1024.0 * 1024.0),
            if p.peak_reset_before_pass {
                "the simulator process's peak while the pass ran"
            } else {
                "the whole simulator process: its peak could not be reset before the pass"
            }
        )
    }

    /// The store's size on disk, for people.
    pub fn store_text(&self) -> String {
        match (self.store_bytes, self.store_bytes_per_device) {
            (Some(b), Some(per)) => format!(
                "{:.1} MiB on disk, {per:.0} bytes per device",
                b as f64 / (1024.0 * 1024.0)
            ),
            _ => NOT_MEASURED.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::verify::{DeviceSideVerification, Verification};

    fn pass(ok: bool) -> Verification {
        Verification::DeviceSide(DeviceSideVerification {
            ok,
            ..DeviceSideVerification::default()
        })
    }

    #[test]
    fn the_verdict_passes_only_a_whole_run() {
        let none = BTreeMap::new();
        assert!(Verdict::of(10, 10, &none, &[], &pass(true)).passed);
        // A lost worker fails the run even when its devices were taken by the others.
        let v = Verdict::of(10, 10, &none, &["worker 3 panicked".into()], &pass(true));
        assert!(!v.passed);
        assert_eq!(
            v.reasons,
            vec!["1 worker(s) stopped early, first: worker 3 panicked".to_string()]
        );
        // Devices that did not complete fail it, with their kinds.
        let errors = BTreeMap::from([("not-run".to_string(), 4u64)]);
        let v = Verdict::of(10, 6, &errors, &[], &pass(true));
        assert_eq!(
            v.reasons,
            vec!["6 of 10 devices completed (failures: not-run 4)".to_string()]
        );
        assert_eq!(v.word(), "FAILED");
        // And so does the pass.
        let v = Verdict::of(10, 10, &none, &[], &pass(false));
        assert_eq!(
            v.reasons,
            vec!["the verification pass found problems".to_string()]
        );
    }
}
