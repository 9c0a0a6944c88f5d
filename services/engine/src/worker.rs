//! A worker: one OS thread per device that owns the running sessions and steps them.
//!
//! Sessions are state machines ([`Task`]) whose `step` does a bounded unit of work (a codec
//! chunk, one LM decoding step). Each iteration of the worker's loop starts queued sessions in
//! free slots ([`Policy::pick`]), then steps every runnable session once, in batches planned by
//! [`Policy::plan`]: sessions whose next steps share a [`BatchKey`] (same model and phase) run
//! as one batched model step ([`Task::step_batch`]); new sessions join the running batch at the
//! next iteration and finished ones leave it (continuous batching).
//!
//! It never polls: it sleeps on its command channel when nothing can run, except while an
//! output channel is full, when it re-checks every few milliseconds until the slow reader
//! catches up or times out. A cancelled client frees its slot before the next step. A panic in
//! a batched step rolls every member back ([`Task::rollback`]) and steps each alone once, so
//! only the session that panics again fails (with `INTERNAL`); the worker and the other
//! sessions go on.

use std::any::Any;
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use crate::error::EngineError;
use crate::metrics::Metrics;
use crate::scheduler::{BatchKey, Candidate, Policy, Priority, StepTimes, deadline_check};

/// What a step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Work was done; step again.
    Progress,
    /// Waiting for client input; step again after a wake-up.
    Idle,
    /// Output could not be delivered (channel full); retry soon.
    Blocked,
    /// Finished (successfully or with an error already sent).
    Done,
}

/// One session's work, run on a worker thread.
pub trait Task: Send + Any {
    /// Does one bounded unit of work alone.
    fn step(&mut self) -> Step;
    /// What the next step can be batched with (`None`: it runs alone).
    fn batch_key(&self) -> Option<BatchKey> {
        None
    }
    /// Steps `self` and `others` (all with `self`'s batch key, hence of `self`'s type) as one
    /// batch; returns the outcome of `self` followed by each of `others`.
    fn step_batch(&mut self, others: &mut [&mut dyn Task]) -> Vec<Step>;
    /// Undoes a step that panicked half-way (the next step redoes it).
    fn rollback(&mut self) {}
    /// Model rows the next step takes (a CFG session: 2).
    fn rows(&self) -> usize {
        1
    }
    /// The session's priority.
    fn priority(&self) -> Priority;
    /// The model's registry name (metrics).
    fn model(&self) -> &str;
    /// `(model, steps)` this session still needs, for deadline estimates.
    fn estimate(&self) -> Option<(String, usize)> {
        None
    }
    /// The session's deadline.
    fn deadline(&self) -> Option<Instant> {
        None
    }
    /// True when nobody waits for the output any more (client gone).
    fn is_cancelled(&self) -> bool;
    /// Reports a failure to the client, if it is still there.
    fn fail(&mut self, err: EngineError);
    /// Short label for logs.
    fn label(&self) -> &str;
    /// The session's tracing span.
    fn span(&self) -> &tracing::Span;
    /// For downcasting the members of a batch.
    fn as_any_mut(&mut self) -> &mut dyn Any;
    /// The concrete type (batches never mix types).
    fn type_key(&self) -> std::any::TypeId;
}

enum Command {
    Submit(u64, Priority, Box<dyn Task>),
    Wake,
    Shutdown,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Submit(..) => "Submit",
            Command::Wake => "Wake",
            Command::Shutdown => "Shutdown",
        })
    }
}

/// Counters shared by a worker and its handles.
#[derive(Debug, Default)]
struct Shared {
    active: AtomicUsize,
    /// Waiting sessions per priority.
    queued: [AtomicUsize; 3],
    next_id: AtomicUsize,
    times: Mutex<StepTimes>,
}

impl Shared {
    fn queued(&self) -> [usize; 3] {
        [0, 1, 2].map(|i| self.queued[i].load(Ordering::SeqCst))
    }
}

/// Handle to a worker thread; cheap to clone.
#[derive(Clone)]
pub struct WorkerHandle {
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    policy: Policy,
    metrics: Arc<Metrics>,
    /// Serialises admission so positions are exact.
    admission: Arc<Mutex<()>>,
    name: Arc<str>,
}

impl std::fmt::Debug for WorkerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerHandle")
            .field("name", &self.name)
            .field("load", &self.load())
            .finish()
    }
}

/// Something that can wake a worker (given to session inputs).
#[derive(Clone, Debug)]
pub struct Waker(mpsc::Sender<Command>);

impl Waker {
    /// Tells the worker that a session may be able to make progress.
    pub fn wake(&self) {
        let _ = self.0.send(Command::Wake);
    }
}

/// Admission outcome.
#[derive(Debug, Clone, Copy)]
pub struct Admitted {
    /// Sessions ahead of this one waiting for a slot (0 = runs at once).
    pub queue_position: usize,
}

impl WorkerHandle {
    /// Starts a worker thread.
    pub fn spawn(
        name: &str,
        policy: Policy,
        slow_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared::default());
        let worker = Worker {
            name: name.to_string(),
            rx,
            shared: shared.clone(),
            policy: policy.clone(),
            metrics: metrics.clone(),
            active: Vec::new(),
            queue: VecDeque::new(),
            slow_timeout,
            iteration: 0,
        };
        std::thread::Builder::new()
            .name(format!("cadenza-worker-{name}"))
            .spawn(move || worker.run())?;
        Ok(Self {
            tx,
            shared,
            policy,
            metrics,
            admission: Arc::new(Mutex::new(())),
            name: name.into(),
        })
    }

    /// Sessions admitted and not yet finished.
    pub fn load(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst) + self.shared.queued().iter().sum::<usize>()
    }

    /// Sessions waiting for a slot.
    pub fn queued(&self) -> usize {
        self.shared.queued().iter().sum()
    }

    /// A waker for session inputs.
    pub fn waker(&self) -> Waker {
        Waker(self.tx.clone())
    }

    /// The worker's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Admits a session, or refuses it at once when the queue is full or its deadline cannot
    /// be met at the measured step time.
    pub fn submit(&self, task: Box<dyn Task>) -> Result<Admitted, EngineError> {
        let _g = self.admission.lock().unwrap_or_else(|e| e.into_inner());
        let p = task.priority();
        let queued = self.shared.queued();
        let active = self.shared.active.load(Ordering::SeqCst);
        let Some(position) = self.policy.admit(p, active, &queued) else {
            self.metrics.reject("overloaded");
            let load = active + queued.iter().sum::<usize>();
            return Err(EngineError::Overloaded {
                queued: load.saturating_sub(self.policy.max_active),
                limit: self.policy.max_queue,
                retry_after: Duration::from_secs(1),
            });
        };
        if let (Some(deadline), Some((model, steps))) = (task.deadline(), task.estimate()) {
            let est = self
                .shared
                .times
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .estimate(&model, steps);
            if let Some(est) = est {
                let remaining = deadline.saturating_duration_since(Instant::now());
                if let Err(msg) = deadline_check(est, remaining) {
                    self.metrics.reject("deadline");
                    return Err(EngineError::DeadlineExceeded(msg));
                }
            }
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::SeqCst) as u64;
        self.shared.queued[p as usize].fetch_add(1, Ordering::SeqCst);
        if self.tx.send(Command::Submit(id, p, task)).is_err() {
            self.shared.queued[p as usize].fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Unavailable("worker stopped".into()));
        }
        self.metrics.set_queue(&self.name, self.queued());
        Ok(Admitted {
            queue_position: position,
        })
    }

    /// Asks the worker to stop after failing its sessions with `UNAVAILABLE`.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
    }
}

struct Slot {
    id: u64,
    priority: Priority,
    task: Box<dyn Task>,
    idle: bool,
    blocked_since: Option<Instant>,
    last_run: u64,
    /// Step alone next time (a batch it was in panicked).
    isolate: bool,
}

/// A session waiting for a slot: id (arrival order), priority, task.
type Queued = (u64, Priority, Box<dyn Task>);

struct Worker {
    name: String,
    rx: mpsc::Receiver<Command>,
    shared: Arc<Shared>,
    policy: Policy,
    metrics: Arc<Metrics>,
    active: Vec<Slot>,
    queue: VecDeque<Queued>,
    slow_timeout: Duration,
    iteration: u64,
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

impl Worker {
    fn run(mut self) {
        loop {
            self.start_queued();
            // Sleep on the channel unless something can run.
            let runnable = self
                .active
                .iter()
                .any(|s| !s.idle && s.blocked_since.is_none());
            let blocked = self.active.iter().any(|s| s.blocked_since.is_some());
            if !runnable {
                let cmd = if blocked {
                    match self.rx.recv_timeout(Duration::from_millis(5)) {
                        Ok(c) => Some(c),
                        Err(mpsc::RecvTimeoutError::Timeout) => None,
                        Err(mpsc::RecvTimeoutError::Disconnected) => return self.stop(),
                    }
                } else {
                    match self.rx.recv() {
                        Ok(c) => Some(c),
                        Err(_) => return self.stop(),
                    }
                };
                if let Some(c) = cmd
                    && !self.handle(c)
                {
                    return self.stop();
                }
                // A wake-up or timeout: every idle or blocked session gets another look.
                for s in &mut self.active {
                    s.idle = false;
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(c) => {
                        if !self.handle(c) {
                            return self.stop();
                        }
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => return self.stop(),
                }
            }
            self.start_queued();
            self.iterate();
        }
    }

    /// Moves queued sessions into free slots, by priority then arrival.
    fn start_queued(&mut self) {
        // Sessions whose client left while queued never take a slot.
        let mut i = 0;
        while i < self.queue.len() {
            if self.queue[i].2.is_cancelled() {
                if let Some((_, p, t)) = self.queue.remove(i) {
                    self.shared.queued[p as usize].fetch_sub(1, Ordering::SeqCst);
                    self.metrics.session_end(t.model(), "cancelled");
                }
            } else {
                i += 1;
            }
        }
        if !self.queue.is_empty() {
            let queued: Vec<(Priority, u64)> =
                self.queue.iter().map(|(id, p, _)| (*p, *id)).collect();
            let active: Vec<Priority> = self.active.iter().map(|s| s.priority).collect();
            let mut pick = self.policy.pick(&queued, &active);
            // Remove from the back first so indices stay valid, then start in pick order.
            let order = pick.clone();
            pick.sort_unstable_by(|a, b| b.cmp(a));
            let mut taken: Vec<(usize, Queued)> = pick
                .into_iter()
                .filter_map(|i| self.queue.remove(i).map(|q| (i, q)))
                .collect();
            for i in order {
                if let Some(pos) = taken.iter().position(|(j, _)| *j == i) {
                    let (_, (id, priority, task)) = taken.swap_remove(pos);
                    self.shared.queued[priority as usize].fetch_sub(1, Ordering::SeqCst);
                    self.shared.active.fetch_add(1, Ordering::SeqCst);
                    self.metrics.add_active(&self.name, task.model(), 1);
                    self.active.push(Slot {
                        id,
                        priority,
                        task,
                        idle: false,
                        blocked_since: None,
                        last_run: self.iteration,
                        isolate: false,
                    });
                }
            }
        }
        self.metrics
            .set_queue(&self.name, self.shared.queued().iter().sum());
    }

    /// Returns false on shutdown.
    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Submit(id, p, task) => {
                self.queue.push_back((id, p, task));
                true
            }
            Command::Wake => {
                for s in &mut self.active {
                    s.idle = false;
                }
                true
            }
            Command::Shutdown => false,
        }
    }

    /// One iteration: drop the cancelled and the slow, then step every runnable session once.
    fn iterate(&mut self) {
        self.iteration += 1;
        let mut finished = vec![false; self.active.len()];
        for (i, slot) in self.active.iter_mut().enumerate() {
            if slot.task.is_cancelled() {
                tracing::debug!(parent: slot.task.span(), task = slot.task.label(), "client gone; session dropped");
                self.metrics.session_end(slot.task.model(), "cancelled");
                finished[i] = true;
            } else if let Some(since) = slot
                .blocked_since
                .filter(|s| s.elapsed() > self.slow_timeout)
            {
                tracing::warn!(parent: slot.task.span(), task = slot.task.label(), waited = ?since.elapsed(), "slow consumer dropped");
                slot.task.fail(EngineError::Cancelled(format!(
                    "client did not read its output for {} s",
                    self.slow_timeout.as_secs()
                )));
                self.metrics.reject("slow_consumer");
                self.metrics.session_end(slot.task.model(), "cancelled");
                finished[i] = true;
            }
        }
        let candidates: Vec<(usize, Candidate<(std::any::TypeId, BatchKey)>)> = self
            .active
            .iter()
            .enumerate()
            .filter(|(i, s)| !finished[*i] && !s.idle)
            .map(|(i, s)| {
                let key = if s.isolate || s.blocked_since.is_some() {
                    None
                } else {
                    s.task.batch_key().map(|k| (s.task.type_key(), k))
                };
                (
                    i,
                    Candidate {
                        id: s.id,
                        priority: s.priority,
                        key,
                        rows: s.task.rows(),
                        last_run: s.last_run,
                    },
                )
            })
            .collect();
        let cands: Vec<_> = candidates.iter().map(|(_, c)| c.clone()).collect();
        for batch in self.policy.plan(&cands) {
            let slots: Vec<usize> = batch.iter().map(|&c| candidates[c].0).collect();
            let key = cands[batch[0]].key.clone();
            for (slot, step) in slots.iter().zip(self.run_batch(&slots, key.map(|k| k.1))) {
                let s = &mut self.active[*slot];
                s.last_run = self.iteration;
                match step {
                    Step::Done => finished[*slot] = true,
                    Step::Progress => s.blocked_since = None,
                    Step::Idle => {
                        s.idle = true;
                        s.blocked_since = None;
                    }
                    Step::Blocked => {
                        s.blocked_since.get_or_insert_with(Instant::now);
                    }
                }
            }
        }
        let mut i = self.active.len();
        while i > 0 {
            i -= 1;
            if finished[i] {
                let s = self.active.swap_remove(i);
                self.shared.active.fetch_sub(1, Ordering::SeqCst);
                self.metrics.add_active(&self.name, s.task.model(), -1);
            }
        }
    }

    /// Steps the sessions in `slots` as one batch (or one alone); a panic fails a session
    /// that was alone, or sends every member of a batch to step alone next time.
    fn run_batch(&mut self, slots: &[usize], key: Option<BatchKey>) -> Vec<Step> {
        let started = Instant::now();
        let mut refs: Vec<&mut Slot> = Vec::with_capacity(slots.len());
        {
            let mut rest: &mut [Slot] = &mut self.active;
            let mut base = 0;
            let mut sorted: Vec<usize> = slots.to_vec();
            sorted.sort_unstable();
            let mut by_index = Vec::with_capacity(slots.len());
            for &i in &sorted {
                let (_, tail) = std::mem::take(&mut rest).split_at_mut(i - base);
                let (head, tail) = tail.split_at_mut(1);
                by_index.push((i, &mut head[0]));
                rest = tail;
                base = i + 1;
            }
            for &i in slots {
                let pos = by_index.iter().position(|(j, _)| *j == i);
                if let Some(pos) = pos {
                    refs.push(by_index.swap_remove(pos).1);
                }
            }
        }
        let span = tracing::debug_span!(
            "step",
            model = key.as_ref().map_or("", |k| k.model.as_str()),
            phase = key.as_ref().map_or("solo", |k| k.phase),
            batch = slots.len()
        );
        // A batched step belongs to every member's request.
        for s in &refs {
            span.follows_from(s.task.span());
        }
        let result = {
            let _e = span.enter();
            let (first, others) = refs.split_first_mut().expect("a batch has a member");
            let mut others: Vec<&mut dyn Task> = others
                .iter_mut()
                .map(|s| &mut *s.task as &mut dyn Task)
                .collect();
            let first = &mut first.task;
            std::panic::catch_unwind(AssertUnwindSafe(|| {
                if others.is_empty() {
                    let span = first.span().clone();
                    let _s = span.enter();
                    vec![first.step()]
                } else {
                    first.step_batch(&mut others)
                }
            }))
        };
        match result {
            Ok(steps) => {
                if let Some(k) = &key {
                    let secs = started.elapsed().as_secs_f64();
                    self.metrics.step(&k.model, k.phase, refs.len(), secs);
                    self.shared
                        .times
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .record(&k.model, secs);
                }
                for s in refs.iter_mut() {
                    s.isolate = false;
                }
                steps
            }
            Err(panic) => {
                let msg = panic_message(&*panic);
                if refs.len() == 1 {
                    let s = &mut refs[0];
                    tracing::error!(parent: s.task.span(), task = s.task.label(), %msg, "session panicked");
                    s.task
                        .fail(EngineError::Internal(format!("session failed: {msg}")));
                    self.metrics.session_end(s.task.model(), "error");
                    vec![Step::Done]
                } else {
                    tracing::error!(%msg, batch = refs.len(), "a batched step panicked; its sessions step alone once");
                    for s in refs.iter_mut() {
                        s.task.rollback();
                        s.isolate = true;
                    }
                    vec![Step::Progress; refs.len()]
                }
            }
        }
    }

    fn stop(mut self) {
        for mut s in self.active.drain(..) {
            s.task
                .fail(EngineError::Unavailable("server is shutting down".into()));
            self.metrics.add_active(&self.name, s.task.model(), -1);
        }
        for (_, _, mut t) in self.queue.drain(..) {
            t.fail(EngineError::Unavailable("server is shutting down".into()));
        }
        self.shared.active.store(0, Ordering::SeqCst);
        for q in &self.shared.queued {
            q.store(0, Ordering::SeqCst);
        }
        self.metrics.set_queue(&self.name, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[derive(Default, Clone)]
    struct Probe {
        done: Arc<AtomicUsize>,
        rolled_back: Arc<AtomicUsize>,
        failed: Arc<Mutex<Vec<String>>>,
        batches: Arc<Mutex<Vec<usize>>>,
        started: Arc<Mutex<Vec<&'static str>>>,
    }

    struct Fake {
        name: &'static str,
        left: usize,
        key: Option<BatchKey>,
        priority: Priority,
        gate: Arc<AtomicBool>,
        panic_at: Option<usize>,
        probe: Probe,
        span: tracing::Span,
        first: bool,
    }

    impl Fake {
        fn new(name: &'static str, gate: &Arc<AtomicBool>, probe: &Probe) -> Self {
            Self {
                name,
                left: 5,
                key: Some(BatchKey {
                    kind: "fake",
                    model: "m".into(),
                    phase: "step",
                }),
                priority: Priority::Interactive,
                gate: gate.clone(),
                panic_at: None,
                probe: probe.clone(),
                span: tracing::Span::none(),
                first: true,
            }
        }

        fn advance(&mut self) -> Step {
            if self.first {
                self.first = false;
                self.probe.started.lock().unwrap().push(self.name);
            }
            if !self.gate.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
                return Step::Progress;
            }
            if Some(self.left) == self.panic_at {
                panic!("boom");
            }
            if self.left == 0 {
                self.probe.done.fetch_add(1, Ordering::SeqCst);
                return Step::Done;
            }
            self.left -= 1;
            Step::Progress
        }
    }

    impl Task for Fake {
        fn step(&mut self) -> Step {
            self.advance()
        }
        fn batch_key(&self) -> Option<BatchKey> {
            self.key.clone()
        }
        fn step_batch(&mut self, others: &mut [&mut dyn Task]) -> Vec<Step> {
            self.probe.batches.lock().unwrap().push(1 + others.len());
            let mut out = vec![self.advance()];
            for o in others.iter_mut() {
                let f = o.as_any_mut().downcast_mut::<Fake>().unwrap();
                out.push(f.advance());
            }
            out
        }
        fn rollback(&mut self) {
            self.probe.rolled_back.fetch_add(1, Ordering::SeqCst);
        }
        fn priority(&self) -> Priority {
            self.priority
        }
        fn model(&self) -> &str {
            "m"
        }
        fn is_cancelled(&self) -> bool {
            false
        }
        fn fail(&mut self, err: EngineError) {
            self.probe.failed.lock().unwrap().push(err.to_string());
        }
        fn label(&self) -> &str {
            self.name
        }
        fn span(&self) -> &tracing::Span {
            &self.span
        }
        fn as_any_mut(&mut self) -> &mut dyn Any {
            self
        }
        fn type_key(&self) -> std::any::TypeId {
            std::any::TypeId::of::<Fake>()
        }
    }

    fn worker(max_active: usize, max_queue: usize) -> WorkerHandle {
        let policy = Policy {
            max_active,
            max_queue,
            live_reserve: 0,
            batch_slots: max_active,
            max_batch_rows: 64,
        };
        WorkerHandle::spawn(
            "t",
            policy,
            Duration::from_secs(5),
            Arc::new(Metrics::default()),
        )
        .unwrap()
    }

    fn wait_until(f: impl Fn() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(t.elapsed() < Duration::from_secs(10), "timed out");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn admission_beyond_queue_is_refused_with_position() {
        let w = worker(1, 2);
        let gate = Arc::new(AtomicBool::new(false));
        let probe = Probe::default();
        for want in 0..3 {
            let a = w.submit(Box::new(Fake::new("a", &gate, &probe))).unwrap();
            assert_eq!(a.queue_position, want);
        }
        match w.submit(Box::new(Fake::new("a", &gate, &probe))) {
            Err(EngineError::Overloaded { queued, limit, .. }) => {
                assert_eq!((queued, limit), (2, 2));
            }
            other => panic!("expected overload, got {other:?}"),
        }
        gate.store(true, Ordering::SeqCst);
        wait_until(|| probe.done.load(Ordering::SeqCst) == 3);
        wait_until(|| w.load() == 0);
        w.shutdown();
    }

    #[test]
    fn sessions_with_one_key_step_as_one_batch() {
        let w = worker(8, 8);
        let gate = Arc::new(AtomicBool::new(false));
        let probe = Probe::default();
        for _ in 0..4 {
            w.submit(Box::new(Fake::new("a", &gate, &probe))).unwrap();
        }
        let mut solo = Fake::new("solo", &gate, &probe);
        solo.key = None;
        w.submit(Box::new(solo)).unwrap();
        wait_until(|| probe.started.lock().unwrap().len() == 5);
        gate.store(true, Ordering::SeqCst);
        wait_until(|| probe.done.load(Ordering::SeqCst) == 5);
        let batches = probe.batches.lock().unwrap().clone();
        assert!(batches.iter().all(|&b| b <= 4), "{batches:?}");
        assert!(
            batches.contains(&4),
            "the four keyed sessions batched: {batches:?}"
        );
        w.shutdown();
    }

    #[test]
    fn a_panic_in_a_batch_fails_only_its_session() {
        let w = worker(4, 4);
        let gate = Arc::new(AtomicBool::new(false));
        let probe = Probe::default();
        let mut bad = Fake::new("bad", &gate, &probe);
        bad.panic_at = Some(3);
        w.submit(Box::new(bad)).unwrap();
        for _ in 0..3 {
            w.submit(Box::new(Fake::new("good", &gate, &probe)))
                .unwrap();
        }
        wait_until(|| probe.started.lock().unwrap().len() == 4);
        gate.store(true, Ordering::SeqCst);
        wait_until(|| probe.done.load(Ordering::SeqCst) == 3);
        wait_until(|| w.load() == 0);
        let failed = probe.failed.lock().unwrap().clone();
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert!(
            failed[0].contains("INTERNAL") || failed[0].contains("boom"),
            "{failed:?}"
        );
        assert!(probe.rolled_back.load(Ordering::SeqCst) >= 4);
        // The worker goes on.
        w.submit(Box::new(Fake::new("after", &gate, &probe)))
            .unwrap();
        wait_until(|| probe.done.load(Ordering::SeqCst) == 4);
        w.shutdown();
    }

    #[test]
    fn queued_live_streams_start_before_batch_jobs() {
        let w = worker(1, 4);
        let gate = Arc::new(AtomicBool::new(false));
        let probe = Probe::default();
        w.submit(Box::new(Fake::new("running", &gate, &probe)))
            .unwrap();
        wait_until(|| probe.started.lock().unwrap().len() == 1);
        let mut batch = Fake::new("batch", &gate, &probe);
        batch.priority = Priority::Batch;
        let mut live = Fake::new("live", &gate, &probe);
        live.priority = Priority::Live;
        assert_eq!(w.submit(Box::new(batch)).unwrap().queue_position, 1);
        assert_eq!(w.submit(Box::new(live)).unwrap().queue_position, 1);
        gate.store(true, Ordering::SeqCst);
        wait_until(|| probe.done.load(Ordering::SeqCst) == 3);
        assert_eq!(
            *probe.started.lock().unwrap(),
            vec!["running", "live", "batch"]
        );
        w.shutdown();
    }
}
