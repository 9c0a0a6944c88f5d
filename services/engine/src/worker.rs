//! A worker: one OS thread per device that owns the running sessions and steps them.
//!
//! Sessions are state machines ([`Task`]) whose `step` does a bounded unit of work (a codec
//! chunk, a decoding step). The worker interleaves the steps of all active sessions
//! round-robin, so a long request never blocks a short one, a cancelled client frees its slot
//! within one step, and a panicking session fails alone. It sleeps on its command channel when
//! nothing can run (no polling), except while an output channel is full: then it re-checks
//! every few milliseconds until the slow reader catches up or times out.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::error::EngineError;

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
pub trait Task: Send {
    /// Does one bounded unit of work.
    fn step(&mut self) -> Step;
    /// True when nobody waits for the output any more (client gone).
    fn is_cancelled(&self) -> bool;
    /// Reports a failure to the client, if it is still there.
    fn fail(&mut self, err: EngineError);
    /// Short label for logs.
    fn label(&self) -> &str;
}

enum Command {
    Submit(Box<dyn Task>),
    Wake,
    Shutdown,
}

/// Handle to a worker thread; cheap to clone.
#[derive(Clone)]
pub struct WorkerHandle {
    tx: mpsc::Sender<Command>,
    /// Sessions admitted and not finished (active + queued).
    load: Arc<AtomicUsize>,
    max_active: usize,
    max_queue: usize,
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

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Submit(_) => "Submit",
            Command::Wake => "Wake",
            Command::Shutdown => "Shutdown",
        })
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
        max_active: usize,
        max_queue: usize,
        slow_timeout: Duration,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let load = Arc::new(AtomicUsize::new(0));
        let worker = Worker {
            rx,
            load: load.clone(),
            max_active,
            active: Vec::new(),
            queue: VecDeque::new(),
            slow_timeout,
        };
        std::thread::Builder::new()
            .name(format!("cadenza-worker-{name}"))
            .spawn(move || worker.run())?;
        Ok(Self {
            tx,
            load,
            max_active,
            max_queue,
            name: name.into(),
        })
    }

    /// Sessions admitted and not yet finished.
    pub fn load(&self) -> usize {
        self.load.load(Ordering::SeqCst)
    }

    /// A waker for session inputs.
    pub fn waker(&self) -> Waker {
        Waker(self.tx.clone())
    }

    /// The worker's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Admits a session or refuses it at once when the queue is full.
    pub fn submit(&self, task: Box<dyn Task>) -> Result<Admitted, EngineError> {
        let limit = self.max_active + self.max_queue;
        let prev = self
            .load
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| {
                (l < limit).then_some(l + 1)
            })
            .map_err(|l| EngineError::Overloaded {
                queued: l.saturating_sub(self.max_active),
                limit: self.max_queue,
                retry_after: Duration::from_secs(1),
            })?;
        if self.tx.send(Command::Submit(task)).is_err() {
            self.load.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Unavailable("worker stopped".into()));
        }
        let queue_position = if prev < self.max_active {
            0
        } else {
            prev - self.max_active + 1
        };
        Ok(Admitted { queue_position })
    }

    /// Asks the worker to stop after failing its sessions with `UNAVAILABLE`.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
    }
}

struct Slot {
    task: Box<dyn Task>,
    idle: bool,
    blocked_since: Option<Instant>,
}

struct Worker {
    rx: mpsc::Receiver<Command>,
    load: Arc<AtomicUsize>,
    max_active: usize,
    active: Vec<Slot>,
    queue: VecDeque<Box<dyn Task>>,
    slow_timeout: Duration,
}

impl Worker {
    fn run(mut self) {
        loop {
            self.admit();
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
            self.admit();
            self.step_all();
        }
    }

    /// Moves queued sessions into free slots, in arrival order.
    fn admit(&mut self) {
        while self.active.len() < self.max_active {
            let Some(task) = self.queue.pop_front() else {
                break;
            };
            self.active.push(Slot {
                task,
                idle: false,
                blocked_since: None,
            });
        }
    }

    /// Returns false on shutdown.
    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Submit(task) => {
                self.queue.push_back(task);
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

    fn step_all(&mut self) {
        let mut i = 0;
        while i < self.active.len() {
            let slot = &mut self.active[i];
            let finished = if slot.task.is_cancelled() {
                tracing::debug!(task = slot.task.label(), "client gone; session dropped");
                true
            } else if slot.idle {
                false
            } else if let Some(since) = slot
                .blocked_since
                .filter(|s| s.elapsed() > self.slow_timeout)
            {
                tracing::warn!(task = slot.task.label(), waited = ?since.elapsed(), "slow consumer dropped");
                slot.task.fail(EngineError::Cancelled(format!(
                    "client did not read its output for {} s",
                    self.slow_timeout.as_secs()
                )));
                true
            } else {
                let task = &mut slot.task;
                match std::panic::catch_unwind(AssertUnwindSafe(|| task.step())) {
                    Ok(Step::Done) => true,
                    Ok(Step::Progress) => {
                        slot.blocked_since = None;
                        false
                    }
                    Ok(Step::Idle) => {
                        slot.idle = true;
                        slot.blocked_since = None;
                        false
                    }
                    Ok(Step::Blocked) => {
                        slot.blocked_since.get_or_insert_with(Instant::now);
                        false
                    }
                    Err(panic) => {
                        let msg = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "unknown panic".into());
                        tracing::error!(task = slot.task.label(), %msg, "session panicked");
                        slot.task
                            .fail(EngineError::Internal(format!("session failed: {msg}")));
                        true
                    }
                }
            };
            if finished {
                self.active.swap_remove(i);
                self.load.fetch_sub(1, Ordering::SeqCst);
            } else {
                i += 1;
            }
        }
    }

    fn stop(mut self) {
        for mut s in self.active.drain(..) {
            s.task
                .fail(EngineError::Unavailable("server is shutting down".into()));
        }
        for mut t in self.queue.drain(..) {
            t.fail(EngineError::Unavailable("server is shutting down".into()));
        }
        self.load.store(0, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    struct Counter {
        left: usize,
        gate: Arc<AtomicBool>,
        done: Arc<AtomicUsize>,
        panic_at: Option<usize>,
        failed: Arc<std::sync::Mutex<Option<String>>>,
    }

    impl Task for Counter {
        fn step(&mut self) -> Step {
            if !self.gate.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
                return Step::Progress;
            }
            if Some(self.left) == self.panic_at {
                panic!("boom");
            }
            if self.left == 0 {
                self.done.fetch_add(1, Ordering::SeqCst);
                return Step::Done;
            }
            self.left -= 1;
            Step::Progress
        }
        fn is_cancelled(&self) -> bool {
            false
        }
        fn fail(&mut self, err: EngineError) {
            *self.failed.lock().unwrap() = Some(err.to_string());
        }
        fn label(&self) -> &str {
            "counter"
        }
    }

    fn counter(
        gate: &Arc<AtomicBool>,
        done: &Arc<AtomicUsize>,
        panic_at: Option<usize>,
    ) -> (Box<dyn Task>, Arc<std::sync::Mutex<Option<String>>>) {
        let failed = Arc::new(std::sync::Mutex::new(None));
        (
            Box::new(Counter {
                left: 5,
                gate: gate.clone(),
                done: done.clone(),
                panic_at,
                failed: failed.clone(),
            }),
            failed,
        )
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
        let w = WorkerHandle::spawn("t", 1, 2, Duration::from_secs(5)).unwrap();
        let gate = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        assert_eq!(
            w.submit(counter(&gate, &done, None).0)
                .unwrap()
                .queue_position,
            0
        );
        assert_eq!(
            w.submit(counter(&gate, &done, None).0)
                .unwrap()
                .queue_position,
            1
        );
        assert_eq!(
            w.submit(counter(&gate, &done, None).0)
                .unwrap()
                .queue_position,
            2
        );
        match w.submit(counter(&gate, &done, None).0) {
            Err(EngineError::Overloaded { queued, limit, .. }) => {
                assert_eq!((queued, limit), (2, 2));
            }
            other => panic!("expected overload, got {other:?}"),
        }
        gate.store(true, Ordering::SeqCst);
        wait_until(|| done.load(Ordering::SeqCst) == 3);
        wait_until(|| w.load() == 0);
        w.shutdown();
    }

    #[test]
    fn a_panicking_session_fails_alone() {
        let w = WorkerHandle::spawn("p", 4, 4, Duration::from_secs(5)).unwrap();
        let gate = Arc::new(AtomicBool::new(true));
        let done = Arc::new(AtomicUsize::new(0));
        let (bad, failed) = counter(&gate, &done, Some(3));
        w.submit(bad).unwrap();
        for _ in 0..3 {
            w.submit(counter(&gate, &done, None).0).unwrap();
        }
        wait_until(|| done.load(Ordering::SeqCst) == 3);
        wait_until(|| failed.lock().unwrap().is_some());
        assert!(failed.lock().unwrap().as_deref().unwrap().contains("boom"));
        wait_until(|| w.load() == 0);
        w.shutdown();
    }
}
