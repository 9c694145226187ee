//! Flow control of exec sessions (protocol version 2, docs/agent.md): the
//! output a session may still send before the host grants more, and the
//! bounded queue of stdin the host sent ahead of the process reading it.
//! Plain blocking types: the threads of a session wait on them.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::protocol::cost;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking holder cannot leave these counters half-written.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Credit for one direction: how much may be sent before the peer grants
/// more. Unlimited for a version-1 host; once nobody reads (the host went
/// away or killed the session) it is abandoned: output is drained and
/// dropped, never held.
pub struct Credit {
    state: Mutex<CreditState>,
    changed: Condvar,
}

struct CreditState {
    available: u64,
    unlimited: bool,
    abandoned: bool,
}

impl Credit {
    pub fn new(window: u32) -> Credit {
        Credit {
            state: Mutex::new(CreditState {
                available: u64::from(window),
                unlimited: false,
                abandoned: false,
            }),
            changed: Condvar::new(),
        }
    }

    pub fn unlimited() -> Credit {
        let credit = Credit::new(0);
        lock(&credit.state).unlimited = true;
        credit
    }

    pub fn grant(&self, amount: u32) {
        let mut state = lock(&self.state);
        state.available = state.available.saturating_add(u64::from(amount));
        self.changed.notify_all();
    }

    /// Nobody reads any more: no limit, and what is sent is dropped.
    pub fn abandon(&self) {
        let mut state = lock(&self.state);
        state.unlimited = true;
        state.abandoned = true;
        self.changed.notify_all();
    }

    pub fn abandoned(&self) -> bool {
        lock(&self.state).abandoned
    }

    /// Waits until at least `at_least` may be spent; answers how much may
    /// (`u64::MAX` when unlimited). Only one thread spends.
    pub fn wait(&self, at_least: u32) -> u64 {
        let state = lock(&self.state);
        let state = self
            .changed
            .wait_while(state, |s| !s.unlimited && s.available < u64::from(at_least))
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if state.unlimited {
            u64::MAX
        } else {
            state.available
        }
    }

    pub fn spend(&self, amount: u32) {
        let mut state = lock(&self.state);
        state.available = state.available.saturating_sub(u64::from(amount));
    }
}

/// Stdin frames waiting for the process to read them, charged at their
/// [`cost`]; at most `limit` is charged. A host that keeps to its window
/// never finds it full; one that does not (a version-1 host) waits in
/// [`StdinQueue::push`], which holds back its whole connection, not memory.
pub struct StdinQueue {
    state: Mutex<QueueState>,
    changed: Condvar,
    limit: u64,
}

#[derive(Default)]
struct QueueState {
    chunks: VecDeque<Vec<u8>>,
    charged: u64,
    /// The host sent end of input.
    ended: bool,
    /// The process no longer reads: drop what comes.
    closed: bool,
}

impl StdinQueue {
    pub fn new(limit: u32) -> StdinQueue {
        StdinQueue {
            state: Mutex::new(QueueState::default()),
            changed: Condvar::new(),
            limit: u64::from(limit),
        }
    }

    /// Queues `bytes`, waiting while the queue is full (one chunk always
    /// fits an empty queue); dropped once the process stopped reading.
    pub fn push(&self, bytes: Vec<u8>) {
        let charge = u64::from(cost(bytes.len()));
        let state = lock(&self.state);
        let mut state = self
            .changed
            .wait_while(state, |s| {
                !s.closed && s.charged > 0 && s.charged + charge > self.limit
            })
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if state.closed || state.ended {
            return;
        }
        state.charged += charge;
        state.chunks.push_back(bytes);
        self.changed.notify_all();
    }

    /// End of input: the process reads what is queued, then end of file.
    pub fn end(&self) {
        lock(&self.state).ended = true;
        self.changed.notify_all();
    }

    /// The process stopped reading (or went away): drop what is queued
    /// and what comes.
    pub fn close(&self) {
        let mut state = lock(&self.state);
        state.closed = true;
        state.chunks.clear();
        state.charged = 0;
        self.changed.notify_all();
    }

    /// The next chunk for the process, waiting for one; None at the end of
    /// input or once closed. Its charge stays until [`StdinQueue::release`].
    pub fn pop(&self) -> Option<Vec<u8>> {
        let state = lock(&self.state);
        let mut state = self
            .changed
            .wait_while(state, |s| s.chunks.is_empty() && !s.ended && !s.closed)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if state.closed {
            return None;
        }
        state.chunks.pop_front()
    }

    /// A popped chunk reached the process: its charge is free again.
    pub fn release(&self, len: usize) {
        let mut state = lock(&self.state);
        state.charged = state.charged.saturating_sub(u64::from(cost(len)));
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn credit_is_spent_granted_and_abandoned() {
        let credit = Arc::new(Credit::new(100));
        assert_eq!(credit.wait(10), 100);
        credit.spend(95);
        let waiter = {
            let credit = credit.clone();
            std::thread::spawn(move || credit.wait(10))
        };
        credit.grant(50);
        // 5 alone is under the 10 asked for: the waiter saw the grant.
        assert_eq!(waiter.join().expect("waiter"), 55);
        credit.spend(55);
        assert!(!credit.abandoned());
        credit.abandon();
        assert_eq!(credit.wait(u32::MAX), u64::MAX);
        assert!(credit.abandoned());
        assert!(!Credit::unlimited().abandoned());
    }

    #[test]
    fn the_stdin_queue_holds_at_most_its_limit_and_closing_frees_a_waiting_push() {
        let limit = cost(100) * 2;
        let queue = Arc::new(StdinQueue::new(limit));
        queue.push(vec![1; 100]);
        queue.push(vec![2; 100]);
        let pusher = {
            let queue = queue.clone();
            std::thread::spawn(move || queue.push(vec![3; 100]))
        };
        assert_eq!(queue.pop(), Some(vec![1; 100]));
        queue.release(100);
        pusher.join().expect("pusher");
        assert_eq!(queue.pop(), Some(vec![2; 100]));
        queue.release(100);
        queue.end();
        assert_eq!(queue.pop(), Some(vec![3; 100]));
        assert_eq!(queue.pop(), None);

        let queue = Arc::new(StdinQueue::new(limit));
        queue.push(vec![0; 100]);
        queue.push(vec![0; 100]);
        let pusher = {
            let queue = queue.clone();
            std::thread::spawn(move || queue.push(vec![0; 100]))
        };
        queue.close();
        pusher.join().expect("a closed queue takes and drops");
        assert_eq!(queue.pop(), None);
    }

    #[test]
    fn one_chunk_always_fits_an_empty_queue() {
        let queue = StdinQueue::new(16);
        queue.push(vec![0; 1000]);
        assert_eq!(queue.pop().map(|c| c.len()), Some(1000));
    }
}
