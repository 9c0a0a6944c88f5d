//! The scheduling policy, as plain data and functions the worker calls (no threads, no
//! channels, no clocks), so every rule is unit-tested here:
//!
//! - **Priorities**: live streams (ASR, TTS) before interactive requests before batch jobs.
//!   Slots are reserved by priority: interactive sessions may fill `max_active - live_reserve`
//!   slots and batch jobs at most `batch_slots`, so a queue of long batch jobs can never keep a
//!   live stream waiting for a slot, and queued sessions are admitted in priority order, then in
//!   arrival order.
//! - **Admission**: beyond `max_active + max_queue` sessions a request is refused at once; its
//!   queue position is reported to every admitted request.
//! - **Batches**: every runnable session steps exactly once per worker iteration (so none
//!   starves); sessions whose next step has the same [`BatchKey`] share one batched step, split
//!   into batches of at most `max_batch_rows` model rows (the step budget); batches run in
//!   priority order, and within a batch the highest-priority, longest-waiting sessions come
//!   first.
//! - **Deadlines**: a request whose deadline is sooner than the measured time its steps need is
//!   refused at admission ([`deadline_check`]).
//!
//! Compare TGI's `Queue`/`State::next_batch` (token budget per batch, priority by arrival) and
//! Triton's sequence batcher (one slot per live sequence), `../shared/reference/serving.md`.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

/// Who is waiting for a session's output, most urgent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Priority {
    /// A live stream (microphone ASR, streamed TTS): a person is waiting in real time.
    Live,
    /// An interactive request (a client waiting for its music).
    #[default]
    Interactive,
    /// A batch job (nobody waits on the stream).
    Batch,
}

impl Priority {
    /// Label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Live => "live",
            Priority::Interactive => "interactive",
            Priority::Batch => "batch",
        }
    }

    /// Parses `live`, `interactive` or `batch`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "live" => Some(Self::Live),
            "interactive" | "" => Some(Self::Interactive),
            "batch" => Some(Self::Batch),
            _ => None,
        }
    }
}

/// Sessions whose next steps can run as one batched step: same task type, model and phase.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BatchKey {
    /// The task type (a music session, an ASR stream…).
    pub kind: &'static str,
    /// The model's registry name.
    pub model: String,
    /// The stage of the model's schedule (e.g. `ar_step`).
    pub phase: &'static str,
}

/// The scheduler's limits.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Sessions stepped concurrently.
    pub max_active: usize,
    /// Sessions waiting for a slot; beyond this, requests are refused.
    pub max_queue: usize,
    /// Slots only live streams may take.
    pub live_reserve: usize,
    /// Most slots batch jobs may hold at once.
    pub batch_slots: usize,
    /// Most model rows (a CFG session counts 2) in one batched step.
    pub max_batch_rows: usize,
}

impl Policy {
    /// Slots a session of priority `p` may use (counting every active session).
    pub fn slot_cap(&self, p: Priority) -> usize {
        let interactive = self.max_active.saturating_sub(self.live_reserve).max(1);
        match p {
            Priority::Live => self.max_active,
            Priority::Interactive => interactive,
            Priority::Batch => self.batch_slots.min(interactive).max(1),
        }
    }

    /// Admission of a new session when `active` sessions run and `queued[p]` wait per
    /// priority: its queue position (0 = runs at once), or `None` when the queue is full.
    pub fn admit(&self, p: Priority, active: usize, queued: &[usize; 3]) -> Option<usize> {
        let waiting: usize = queued.iter().sum();
        if active + waiting >= self.max_active + self.max_queue {
            return None;
        }
        // Waiting sessions of the same or higher priority take the free slots first.
        let ahead: usize = queued[..=p as usize].iter().sum();
        let free = self.slot_cap(p).saturating_sub(active);
        Some(if ahead < free { 0 } else { ahead - free + 1 })
    }

    /// Which queued sessions (`(priority, arrival)`, any order) start now, given the
    /// priorities of the active ones. Returns indices into `queued`, in start order.
    pub fn pick(&self, queued: &[(Priority, u64)], active: &[Priority]) -> Vec<usize> {
        let mut order: Vec<usize> = (0..queued.len()).collect();
        order.sort_by_key(|&i| queued[i]);
        let mut n = active.len();
        let mut out = Vec::new();
        for i in order {
            if n < self.slot_cap(queued[i].0) {
                out.push(i);
                n += 1;
            }
        }
        out
    }

    /// Splits this iteration's runnable sessions into steps. Every candidate appears in
    /// exactly one returned batch (its index into `runnable`); candidates without a key step
    /// alone. Batches are ordered by their most urgent member.
    pub fn plan<K: Eq + Hash + Clone>(&self, runnable: &[Candidate<K>]) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..runnable.len()).collect();
        // Most urgent first: priority, then the longest wait since the last step, then id.
        order.sort_by_key(|&i| {
            let c = &runnable[i];
            (c.priority, c.last_run, c.id)
        });
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut by_key: HashMap<K, usize> = HashMap::new();
        for i in order {
            match &runnable[i].key {
                None => groups.push(vec![i]),
                Some(k) => match by_key.get(k) {
                    Some(&g) => groups[g].push(i),
                    None => {
                        by_key.insert(k.clone(), groups.len());
                        groups.push(vec![i]);
                    }
                },
            }
        }
        let budget = self.max_batch_rows.max(1);
        let mut batches = Vec::new();
        for g in groups {
            let mut cur: Vec<usize> = Vec::new();
            let mut rows = 0;
            for i in g {
                let r = runnable[i].rows.max(1);
                if !cur.is_empty() && rows + r > budget {
                    batches.push(std::mem::take(&mut cur));
                    rows = 0;
                }
                cur.push(i);
                rows += r;
            }
            if !cur.is_empty() {
                batches.push(cur);
            }
        }
        // Groups were built in urgency order of their first member; splitting kept the order.
        batches
    }
}

/// A session that can step this iteration.
#[derive(Debug, Clone)]
pub struct Candidate<K> {
    /// The session's id (arrival order).
    pub id: u64,
    /// Its priority.
    pub priority: Priority,
    /// What it can be batched with (`None`: steps alone).
    pub key: Option<K>,
    /// Model rows its step takes (a CFG session: 2).
    pub rows: usize,
    /// The iteration it last stepped in.
    pub last_run: u64,
}

/// Refuses work whose deadline is sooner than its estimated run time.
pub fn deadline_check(estimate: Duration, remaining: Duration) -> Result<(), String> {
    if estimate > remaining {
        Err(format!(
            "the request needs about {:.1} s at the current step time, its deadline allows {:.1} s",
            estimate.as_secs_f64(),
            remaining.as_secs_f64()
        ))
    } else {
        Ok(())
    }
}

/// Exponential moving average of step times per batch key, for deadline estimates.
#[derive(Debug, Default)]
pub struct StepTimes {
    ema: HashMap<String, f64>,
}

impl StepTimes {
    /// Records a step of `model` that took `secs`.
    pub fn record(&mut self, model: &str, secs: f64) {
        let e = self.ema.entry(model.to_string()).or_insert(secs);
        *e = 0.8 * *e + 0.2 * secs;
    }

    /// Estimated time of `steps` steps of `model` (`None` before any was measured).
    pub fn estimate(&self, model: &str, steps: usize) -> Option<Duration> {
        self.ema
            .get(model)
            .map(|s| Duration::from_secs_f64(s * steps as f64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Priority::*;

    fn policy() -> Policy {
        Policy {
            max_active: 4,
            max_queue: 3,
            live_reserve: 1,
            batch_slots: 2,
            max_batch_rows: 4,
        }
    }

    #[test]
    fn admission_reports_position_and_refuses_a_full_queue() {
        let p = policy();
        assert_eq!(p.admit(Interactive, 0, &[0, 0, 0]), Some(0));
        // Interactive sessions leave one slot to live streams.
        assert_eq!(p.admit(Interactive, 3, &[0, 0, 0]), Some(1));
        assert_eq!(p.admit(Live, 3, &[0, 0, 0]), Some(0));
        // A live stream queues ahead of waiting interactive and batch sessions.
        assert_eq!(p.admit(Live, 4, &[0, 1, 1]), Some(1));
        assert_eq!(p.admit(Batch, 4, &[0, 1, 1]), Some(3));
        // 4 active + 3 queued = the limit.
        assert_eq!(p.admit(Live, 4, &[1, 1, 1]), None);
    }

    #[test]
    fn batch_jobs_never_take_the_slots_of_others() {
        let p = policy();
        assert_eq!(p.slot_cap(Batch), 2);
        assert_eq!(p.admit(Batch, 2, &[0, 0, 0]), Some(1));
        // Queue: batch (arrived first), interactive, live; active: one batch job, and batch
        // jobs may hold two slots of four, interactive ones three.
        let queued = [(Batch, 1), (Interactive, 2), (Live, 3)];
        let start = p.pick(&queued, &[Batch]);
        assert_eq!(
            start,
            vec![2, 1],
            "live first, then interactive; batch waits"
        );
        assert_eq!(
            p.pick(&queued, &[Batch, Batch]),
            vec![2],
            "interactive: 3 slots"
        );
        // With one slot left only the live stream may take it.
        assert_eq!(p.pick(&queued, &[Batch, Batch, Interactive]), vec![2]);
    }

    #[test]
    fn plan_steps_everyone_once_batched_by_key_within_budget() {
        let p = policy();
        let c = |id: u64, priority, key: Option<&'static str>, rows, last_run| Candidate {
            id,
            priority,
            key,
            rows,
            last_run,
        };
        let runnable = vec![
            c(0, Batch, Some("music"), 2, 5),
            c(1, Interactive, Some("music"), 2, 5),
            c(2, Interactive, None, 1, 5),
            c(3, Interactive, Some("music"), 2, 3),
            c(4, Live, Some("asr"), 1, 5),
            c(5, Interactive, Some("music"), 2, 5),
        ];
        let plan = p.plan(&runnable);
        // Live batch first; music sessions by priority and wait, 4 rows (2 sessions) each.
        assert_eq!(plan, vec![vec![4], vec![3, 1], vec![5, 0], vec![2]]);
        let mut all: Vec<usize> = plan.concat();
        all.sort();
        assert_eq!(all, (0..runnable.len()).collect::<Vec<_>>());
    }

    #[test]
    fn deadlines_that_cannot_be_met_are_refused() {
        let mut t = StepTimes::default();
        assert_eq!(t.estimate("m", 10), None);
        t.record("m", 0.1);
        let est = t.estimate("m", 100).unwrap();
        assert!((est.as_secs_f64() - 10.0).abs() < 1e-9);
        assert!(deadline_check(est, Duration::from_secs(5)).is_err());
        assert!(deadline_check(est, Duration::from_secs(11)).is_ok());
    }
}
