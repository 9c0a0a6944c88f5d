//! Pieces every session task shares: an outbox that never blocks the worker (a full channel
//! makes the task `Blocked`, and the worker drops a reader that stays slow), the deadline, and
//! the terminal-error slot.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::error::EngineError;
use crate::metrics::Metrics;
use crate::scheduler::{BatchKey, Priority};
use crate::worker::{Step, Task};

/// Where a task sends its events, and where its terminal error goes.
pub(crate) type Output<E> = (mpsc::Sender<Result<E, EngineError>>, crate::TerminalSlot);

/// Output side shared by all tasks: an outbox that never blocks the worker.
pub(crate) struct Outbox<E> {
    tx: mpsc::Sender<Result<E, EngineError>>,
    pending: VecDeque<Result<E, EngineError>>,
    terminal: crate::TerminalSlot,
}

impl<E> Outbox<E> {
    /// True when the receiver is gone (the client left).
    pub(crate) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    pub(crate) fn push(&mut self, ev: E) {
        self.pending.push_back(Ok(ev));
    }

    /// Sends what it can; true when nothing is left pending.
    pub(crate) fn flush(&mut self) -> bool {
        while let Some(ev) = self.pending.pop_front() {
            match self.tx.try_send(ev) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(ev)) => {
                    self.pending.push_front(ev);
                    return false;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.pending.clear();
                    return true;
                }
            }
        }
        true
    }

    /// Ends the session with `err`. The error goes to the terminal slot, not the channel: the
    /// channel may be full (that is why a slow consumer is failed), and the receiver reports
    /// the slot's error once it has drained what was already sent.
    pub(crate) fn fail(&mut self, err: EngineError) {
        self.pending.clear();
        self.terminal.set(err);
    }
}

/// Who a session is and where it reports: the fields every task shares besides its output.
pub(crate) struct Meta {
    /// The model's registry name.
    pub(crate) model: String,
    /// Scheduling priority.
    pub(crate) priority: Priority,
    /// The session's deadline.
    pub(crate) deadline: Option<Instant>,
    /// Metrics sink.
    pub(crate) metrics: Arc<Metrics>,
    /// Span that follows the request from its handler to its steps.
    pub(crate) span: tracing::Span,
}

/// Common pieces of a task: its outbox, deadline and completion.
pub(crate) struct Base<E> {
    pub(crate) label: String,
    pub(crate) out: Outbox<E>,
    pub(crate) meta: Meta,
    created: Instant,
    first_chunk: bool,
    finished: bool,
}

impl<E> Base<E> {
    pub(crate) fn new(label: String, out: Output<E>, meta: Meta) -> Self {
        let (tx, terminal) = out;
        Self {
            label,
            out: Outbox {
                tx,
                pending: VecDeque::new(),
                terminal,
            },
            meta,
            created: Instant::now(),
            first_chunk: false,
            finished: false,
        }
    }

    /// Records the time to the first chunk of output (once per session).
    pub(crate) fn chunk_sent(&mut self, kind: &str) {
        if !self.first_chunk {
            self.first_chunk = true;
            let secs = self.created.elapsed().as_secs_f64();
            self.meta.metrics.first_chunk(&self.meta.model, kind, secs);
            tracing::debug!(parent: &self.meta.span, secs, "first chunk");
        }
    }

    /// Before a step: deliver pending output and enforce the deadline.
    pub(crate) fn pre_step(&mut self) -> Option<Step> {
        if !self.out.flush() {
            return Some(Step::Blocked);
        }
        if self.finished {
            return Some(Step::Done);
        }
        if self.meta.deadline.is_some_and(|d| Instant::now() > d) {
            self.out.fail(EngineError::DeadlineExceeded(
                "the request's deadline passed while it ran".into(),
            ));
            self.meta.metrics.reject("deadline");
            self.meta.metrics.session_end(&self.meta.model, "error");
            return Some(Step::Done);
        }
        None
    }

    /// After a step that may have produced output.
    pub(crate) fn post_step(&mut self, result: Result<bool, EngineError>) -> Step {
        match result {
            Err(e) => {
                tracing::debug!(parent: &self.meta.span, error = %e, "session failed");
                self.out.fail(e);
                self.meta.metrics.session_end(&self.meta.model, "error");
                Step::Done
            }
            Ok(done) => {
                if done && !self.finished {
                    self.meta.metrics.session_end(&self.meta.model, "ok");
                }
                self.finished = done;
                if !self.out.flush() {
                    Step::Blocked
                } else if done {
                    Step::Done
                } else {
                    Step::Progress
                }
            }
        }
    }

    /// The outcome of a run (`Some(done)` or `None` = waiting for input) as a worker step.
    fn outcome(&mut self, r: Result<Option<bool>, EngineError>) -> Step {
        match r {
            Ok(None) => Step::Idle,
            Ok(Some(done)) => self.post_step(Ok(done)),
            Err(e) => self.post_step(Err(e)),
        }
    }
}

/// A session's work in terms of its [`Base`]: every task implements this and gets the worker's
/// [`Task`] for free (flush before work, deadline, failure reporting, cancellation check,
/// batching).
pub(crate) trait Stepper: Send + Sized + 'static {
    /// The events the session sends.
    type Event: Send;
    /// The shared parts.
    fn base(&self) -> &Base<Self::Event>;
    /// The shared parts, mutably.
    fn base_mut(&mut self) -> &mut Base<Self::Event>;
    /// One bounded unit of work: `Some(done)`, or `None` when waiting for client input.
    fn run(&mut self) -> Result<Option<bool>, EngineError>;
    /// What the next step can be batched with.
    fn batch_key(&self) -> Option<BatchKey> {
        None
    }
    /// One unit of work for several sessions with the same batch key, as one batched step.
    fn run_batch(items: &mut [&mut Self]) -> Vec<Result<Option<bool>, EngineError>> {
        items.iter_mut().map(|t| t.run()).collect()
    }
    /// Undoes a batched step that panicked half-way.
    fn rollback(&mut self) {}
    /// Model rows of the next step.
    fn rows(&self) -> usize {
        1
    }
    /// Steps still needed, for deadline estimates.
    fn remaining_steps(&self) -> Option<usize> {
        None
    }
}

impl<S: Stepper> Task for S {
    fn step(&mut self) -> Step {
        if let Some(s) = self.base_mut().pre_step() {
            return s;
        }
        let r = self.run();
        self.base_mut().outcome(r)
    }
    fn batch_key(&self) -> Option<BatchKey> {
        Stepper::batch_key(self)
    }
    fn step_batch(&mut self, others: &mut [&mut dyn Task]) -> Vec<Step> {
        let mut items: Vec<&mut S> = Vec::with_capacity(1 + others.len());
        items.push(self);
        for o in others.iter_mut() {
            match o.as_any_mut().downcast_mut::<S>() {
                Some(t) => items.push(t),
                None => panic!("a batch mixes task types"),
            }
        }
        let mut steps: Vec<Option<Step>> =
            items.iter_mut().map(|t| t.base_mut().pre_step()).collect();
        let mut idx = Vec::new();
        let mut ready: Vec<&mut S> = Vec::new();
        for (i, t) in items.into_iter().enumerate() {
            if steps[i].is_none() {
                idx.push(i);
                ready.push(t);
            }
        }
        if !ready.is_empty() {
            let results = S::run_batch(&mut ready);
            for ((i, t), r) in idx.into_iter().zip(ready).zip(results) {
                steps[i] = Some(t.base_mut().outcome(r));
            }
        }
        steps
            .into_iter()
            .map(|s| s.unwrap_or(Step::Progress))
            .collect()
    }
    fn rollback(&mut self) {
        Stepper::rollback(self)
    }
    fn rows(&self) -> usize {
        Stepper::rows(self)
    }
    fn priority(&self) -> Priority {
        self.base().meta.priority
    }
    fn model(&self) -> &str {
        &self.base().meta.model
    }
    fn estimate(&self) -> Option<(String, usize)> {
        self.remaining_steps()
            .map(|n| (self.base().meta.model.clone(), n))
    }
    fn deadline(&self) -> Option<Instant> {
        self.base().meta.deadline
    }
    fn is_cancelled(&self) -> bool {
        self.base().out.is_closed()
    }
    fn fail(&mut self, err: EngineError) {
        self.base_mut().out.fail(err)
    }
    fn label(&self) -> &str {
        &self.base().label
    }
    fn span(&self) -> &tracing::Span {
        &self.base().meta.span
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
    fn type_key(&self) -> std::any::TypeId {
        std::any::TypeId::of::<S>()
    }
}
