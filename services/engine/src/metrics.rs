//! The engine's metrics, rendered in the Prometheus text exposition format (version 0.0.4) by
//! [`Metrics::render`]; the server serves them on its metrics port at `/metrics`.
//!
//! A handful of families with label values fixed by the engine (model names, phases, reasons),
//! kept behind mutexes that are only taken once per step or per event, never per sample.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Step-time buckets, seconds.
const TIME_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Batch-size buckets, sessions.
const SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

type Labels = Vec<(&'static str, String)>;

#[derive(Debug, Clone, Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

#[derive(Debug)]
struct Family<T> {
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    series: Mutex<BTreeMap<Labels, T>>,
}

impl<T: Clone + Default> Family<T> {
    fn new(name: &'static str, kind: &'static str, help: &'static str) -> Self {
        Self {
            name,
            help,
            kind,
            series: Mutex::new(BTreeMap::new()),
        }
    }

    fn with(&self, labels: Labels, f: impl FnOnce(&mut T)) {
        let mut g = self.series.lock().unwrap_or_else(|e| e.into_inner());
        f(g.entry(labels).or_default());
    }

    fn get(&self, labels: &Labels) -> Option<T> {
        let g = self.series.lock().unwrap_or_else(|e| e.into_inner());
        g.get(labels).cloned()
    }

    fn snapshot(&self) -> Vec<(Labels, T)> {
        let g = self.series.lock().unwrap_or_else(|e| e.into_inner());
        g.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

fn fmt_labels(labels: &Labels, extra: Option<(&str, String)>) -> String {
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{v}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Every metric the engine exports.
#[derive(Debug)]
pub struct Metrics {
    queue: Family<f64>,
    active: Family<f64>,
    batch_size: Family<Histogram>,
    step_seconds: Family<Histogram>,
    first_chunk_seconds: Family<Histogram>,
    partial_latency_seconds: Family<Histogram>,
    tokens: Family<f64>,
    audio_seconds: Family<f64>,
    rejections: Family<f64>,
    sessions: Family<f64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            queue: Family::new(
                "cadenza_queue_length",
                "gauge",
                "Sessions admitted and waiting for a slot, per worker.",
            ),
            active: Family::new(
                "cadenza_active_sessions",
                "gauge",
                "Sessions holding a slot, per worker and model.",
            ),
            batch_size: Family::new(
                "cadenza_batch_size",
                "histogram",
                "Sessions stepped together in one model step.",
            ),
            step_seconds: Family::new(
                "cadenza_step_seconds",
                "histogram",
                "Wall time of one (batched) model step.",
            ),
            first_chunk_seconds: Family::new(
                "cadenza_time_to_first_chunk_seconds",
                "histogram",
                "From admission to the first audio or codes chunk of a session.",
            ),
            partial_latency_seconds: Family::new(
                "cadenza_asr_partial_latency_seconds",
                "histogram",
                "Speech recognition: from the arrival of the audio chunk that completed a hypothesis \
                 to that hypothesis being sent, by pass.",
            ),
            tokens: Family::new(
                "cadenza_tokens_total",
                "counter",
                "Codec tokens generated or encoded.",
            ),
            audio_seconds: Family::new(
                "cadenza_audio_seconds_total",
                "counter",
                "Seconds of audio produced (generated or decoded) or consumed (encoded).",
            ),
            rejections: Family::new(
                "cadenza_rejections_total",
                "counter",
                "Requests refused or stopped by the engine, by reason.",
            ),
            sessions: Family::new(
                "cadenza_sessions_total",
                "counter",
                "Sessions finished, by model and outcome.",
            ),
        }
    }
}

fn observe(h: &mut Histogram, buckets: &[f64], v: f64) {
    if h.counts.is_empty() {
        h.counts = vec![0; buckets.len()];
    }
    for (c, b) in h.counts.iter_mut().zip(buckets) {
        if v <= *b {
            *c += 1;
        }
    }
    h.sum += v;
    h.count += 1;
}

impl Metrics {
    /// Sets the queue length of `worker`.
    pub fn set_queue(&self, worker: &str, n: usize) {
        self.queue
            .with(vec![("worker", worker.into())], |v| *v = n as f64);
    }

    /// Adds `delta` to the active sessions of `model` on `worker`.
    pub fn add_active(&self, worker: &str, model: &str, delta: i64) {
        self.active.with(
            vec![("worker", worker.into()), ("model", model.into())],
            |v| *v = (*v + delta as f64).max(0.0),
        );
    }

    /// Active sessions of `model` (all workers).
    pub fn active(&self, model: &str) -> usize {
        self.active
            .snapshot()
            .iter()
            .filter(|(l, _)| l.iter().any(|(k, v)| *k == "model" && v == model))
            .map(|(_, v)| *v as usize)
            .sum()
    }

    /// Records one model step of `sessions` sessions that took `secs`.
    pub fn step(&self, model: &str, phase: &str, sessions: usize, secs: f64) {
        let l: Labels = vec![("model", model.into()), ("phase", phase.into())];
        self.batch_size
            .with(l.clone(), |h| observe(h, SIZE_BUCKETS, sessions as f64));
        self.step_seconds
            .with(l, |h| observe(h, TIME_BUCKETS, secs));
    }

    /// Records a session's time to its first chunk.
    pub fn first_chunk(&self, model: &str, kind: &str, secs: f64) {
        self.first_chunk_seconds
            .with(vec![("model", model.into()), ("kind", kind.into())], |h| {
                observe(h, TIME_BUCKETS, secs)
            });
    }

    /// Records the latency of one recognition hypothesis (`pass`: `partial` or `final`).
    pub fn partial_latency(&self, model: &str, pass: &str, secs: f64) {
        self.partial_latency_seconds
            .with(vec![("model", model.into()), ("pass", pass.into())], |h| {
                observe(h, TIME_BUCKETS, secs)
            });
    }

    /// Counts tokens produced or consumed.
    pub fn tokens(&self, model: &str, n: u64) {
        self.tokens
            .with(vec![("model", model.into())], |v| *v += n as f64);
    }

    /// Counts audio seconds; `direction` is `out` (produced) or `in` (consumed).
    pub fn audio_seconds(&self, model: &str, direction: &'static str, s: f64) {
        self.audio_seconds.with(
            vec![("model", model.into()), ("direction", direction.into())],
            |v| *v += s,
        );
    }

    /// Counts a refusal (`overloaded`, `deadline`, `invalid`, `not_found`, `slow_consumer`…).
    pub fn reject(&self, reason: &str) {
        self.rejections
            .with(vec![("reason", reason.into())], |v| *v += 1.0);
    }

    /// Refusals for `reason` so far.
    pub fn rejections(&self, reason: &str) -> u64 {
        self.rejections
            .get(&vec![("reason", reason.into())])
            .unwrap_or(0.0) as u64
    }

    /// Counts a finished session (`ok`, `error`, `cancelled`).
    pub fn session_end(&self, model: &str, outcome: &'static str) {
        self.sessions.with(
            vec![("model", model.into()), ("outcome", outcome.into())],
            |v| *v += 1.0,
        );
    }

    /// Number of steps recorded for `model` (all phases).
    pub fn steps(&self, model: &str) -> u64 {
        self.step_seconds
            .snapshot()
            .iter()
            .filter(|(l, _)| l.iter().any(|(k, v)| *k == "model" && v == model))
            .map(|(_, h)| h.count)
            .sum()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for f in [
            &self.queue,
            &self.active,
            &self.tokens,
            &self.audio_seconds,
            &self.rejections,
            &self.sessions,
        ] {
            let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
            let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
            for (l, v) in f.snapshot() {
                let _ = writeln!(out, "{}{} {}", f.name, fmt_labels(&l, None), v);
            }
        }
        for (f, buckets) in [
            (&self.batch_size, SIZE_BUCKETS),
            (&self.step_seconds, TIME_BUCKETS),
            (&self.first_chunk_seconds, TIME_BUCKETS),
            (&self.partial_latency_seconds, TIME_BUCKETS),
        ] {
            let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
            let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
            for (l, h) in f.snapshot() {
                for (c, b) in h.counts.iter().zip(buckets) {
                    let _ = writeln!(
                        out,
                        "{}_bucket{} {c}",
                        f.name,
                        fmt_labels(&l, Some(("le", b.to_string())))
                    );
                }
                let _ = writeln!(
                    out,
                    "{}_bucket{} {}",
                    f.name,
                    fmt_labels(&l, Some(("le", "+Inf".into()))),
                    h.count
                );
                let _ = writeln!(out, "{}_sum{} {}", f.name, fmt_labels(&l, None), h.sum);
                let _ = writeln!(out, "{}_count{} {}", f.name, fmt_labels(&l, None), h.count);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.set_queue("cpu", 3);
        m.add_active("cpu", "tiny", 2);
        m.add_active("cpu", "tiny", -1);
        m.step("tiny", "ar_step", 3, 0.02);
        m.step("tiny", "ar_step", 1, 0.2);
        m.reject("overloaded");
        m.tokens("tiny", 40);
        let t = m.render();
        assert!(
            t.contains("cadenza_queue_length{worker=\"cpu\"} 3\n"),
            "{t}"
        );
        assert!(t.contains("cadenza_active_sessions{worker=\"cpu\",model=\"tiny\"} 1\n"));
        assert!(t.contains(
            "cadenza_step_seconds_bucket{model=\"tiny\",phase=\"ar_step\",le=\"0.025\"} 1\n"
        ));
        assert!(t.contains(
            "cadenza_step_seconds_bucket{model=\"tiny\",phase=\"ar_step\",le=\"+Inf\"} 2\n"
        ));
        assert!(t.contains("cadenza_batch_size_sum{model=\"tiny\",phase=\"ar_step\"} 4\n"));
        assert!(t.contains("cadenza_rejections_total{reason=\"overloaded\"} 1\n"));
        assert!(t.contains("# TYPE cadenza_step_seconds histogram\n"));
        assert_eq!(m.active("tiny"), 1);
        assert_eq!(m.steps("tiny"), 2);
        assert_eq!(m.rejections("overloaded"), 1);
    }
}
