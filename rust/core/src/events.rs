//! Problems of the worker's background tasks, handed to the caller as they happen (Python logs
//! them), instead of being found by polling counters.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use tokio::sync::Notify;

/// Repeats of the newest event fold into it, so a caller that falls behind holds a few entries,
/// never one per failure.
const MAX_QUEUED: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// An outcome flush failed; it is retried, and the outcomes stay counted as in flight.
    FlushFailed,
    /// Extending the leases of running handlers failed; they may expire and be redelivered.
    LeaseExtensionFailed,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::FlushFailed => "flush",
            EventKind::LeaseExtensionFailed => "extend",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerEvent {
    pub kind: EventKind,
    /// The newest error's message.
    pub message: String,
    /// How many failures this event stands for.
    pub count: u64,
}

#[derive(Debug, Default)]
pub struct Events {
    queue: Mutex<VecDeque<WorkerEvent>>,
    ready: Notify,
    closed: AtomicBool,
}

impl Events {
    pub fn push(&self, kind: EventKind, message: String) {
        {
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            let full = queue.len() >= MAX_QUEUED;
            match queue.back_mut() {
                Some(last) if last.kind == kind || full => {
                    last.count += 1;
                    last.kind = kind;
                    last.message = message;
                }
                _ => queue.push_back(WorkerEvent {
                    kind,
                    message,
                    count: 1,
                }),
            }
        }
        self.ready.notify_one();
    }

    /// No more events come: `next` returns None once the queue is empty.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.ready.notify_waiters();
        self.ready.notify_one();
    }

    pub async fn next(&self) -> Option<WorkerEvent> {
        loop {
            let ready = self.ready.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            if let Some(event) = self.queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front() {
                return Some(event);
            }
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            ready.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn repeats_fold_and_close_ends_the_stream() {
        let events = Events::default();
        events.push(EventKind::FlushFailed, "a".into());
        events.push(EventKind::FlushFailed, "b".into());
        events.push(EventKind::LeaseExtensionFailed, "c".into());
        events.close();
        let first = block_on(events.next()).unwrap();
        assert_eq!(
            (first.kind, first.message.as_str(), first.count),
            (EventKind::FlushFailed, "b", 2)
        );
        let second = block_on(events.next()).unwrap();
        assert_eq!((second.kind.as_str(), second.count), ("extend", 1));
        assert_eq!(block_on(events.next()), None);
    }

    #[test]
    fn a_waiting_reader_gets_the_next_event() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let events = std::sync::Arc::new(Events::default());
        let reader = rt.spawn({
            let events = std::sync::Arc::clone(&events);
            async move { events.next().await }
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        events.push(EventKind::FlushFailed, "x".into());
        let got = rt.block_on(reader).unwrap().unwrap();
        assert_eq!((got.message.as_str(), got.count), ("x", 1));
    }

    #[test]
    fn the_queue_stays_bounded() {
        let events = Events::default();
        for i in 0..1000 {
            let kind = if i % 2 == 0 {
                EventKind::FlushFailed
            } else {
                EventKind::LeaseExtensionFailed
            };
            events.push(kind, i.to_string());
        }
        let n = events.queue.lock().unwrap().len();
        assert_eq!(n, MAX_QUEUED);
        let total: u64 = events.queue.lock().unwrap().iter().map(|e| e.count).sum();
        assert_eq!(total, 1000);
    }
}
