//! Pieces every session task shares: an outbox that never blocks the worker (a full channel
//! makes the task `Blocked`, and the worker drops a reader that stays slow), the deadline, and
//! the terminal-error slot.

use std::collections::VecDeque;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::error::EngineError;
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

/// Common pieces of a task: its outbox, deadline and completion.
pub(crate) struct Base<E> {
    pub(crate) label: String,
    pub(crate) out: Outbox<E>,
    deadline: Option<Instant>,
    finished: bool,
}

impl<E> Base<E> {
    pub(crate) fn new(label: String, out: Output<E>, deadline: Option<Instant>) -> Self {
        let (tx, terminal) = out;
        Self {
            label,
            out: Outbox {
                tx,
                pending: VecDeque::new(),
                terminal,
            },
            deadline,
            finished: false,
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
        if self.deadline.is_some_and(|d| Instant::now() > d) {
            self.out.fail(EngineError::DeadlineExceeded(
                "the request's deadline passed while it ran".into(),
            ));
            return Some(Step::Done);
        }
        None
    }

    /// After a step that may have produced output.
    pub(crate) fn post_step(&mut self, result: Result<bool, EngineError>) -> Step {
        match result {
            Err(e) => {
                self.out.fail(e);
                Step::Done
            }
            Ok(done) => {
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
}

/// A session's work in terms of its [`Base`]: every task implements this and gets the worker's
/// [`Task`] for free (flush before work, deadline, failure reporting, cancellation check).
pub(crate) trait Stepper: Send {
    /// The events the session sends.
    type Event: Send;
    /// The shared parts.
    fn base(&self) -> &Base<Self::Event>;
    /// The shared parts, mutably.
    fn base_mut(&mut self) -> &mut Base<Self::Event>;
    /// One bounded unit of work: `Some(done)`, or `None` when waiting for client input.
    fn run(&mut self) -> Result<Option<bool>, EngineError>;
}

impl<S: Stepper> Task for S {
    fn step(&mut self) -> Step {
        if let Some(s) = self.base_mut().pre_step() {
            return s;
        }
        match self.run() {
            Ok(None) => Step::Idle,
            Ok(Some(done)) => self.base_mut().post_step(Ok(done)),
            Err(e) => self.base_mut().post_step(Err(e)),
        }
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
}
