//! The worker's hot path: claim loop (NOTIFY wake-up, polling fallback), lease tracking, lease
//! keeper, outcome flusher and the shutdown sequence. Python only runs handlers: it awaits
//! `next_batch`, and reports each outcome with `report`, a non-blocking push into a channel.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::engine::{Claimed, Engine};
use crate::error::{CoreError, CoreResult};
use crate::outcome::{Lease, Outcome};
use crate::sql;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub domain: String,
    /// Seconds a claimed message stays invisible to other workers.
    pub visibility_timeout: i32,
    /// max_attempts for commands sent without one (the worker's RetryPolicy).
    pub default_max_attempts: i32,
    pub use_notify: bool,
    pub poll_interval: Duration,
    /// Most outcomes applied in one flush.
    pub max_flush: usize,
    /// `next_batch` claims nothing while more outcomes than this wait for their flush, so the
    /// leases a worker holds stay bounded when the database applies outcomes more slowly than
    /// handlers produce them (unbounded, the claimed-but-unfinished messages piled up, every
    /// claim had to scan past them, and their leases could expire into redeliveries).
    pub max_unflushed: usize,
    /// Keep extending the leases of running handlers (for handlers longer than the timeout).
    pub auto_extend: bool,
}

impl WorkerConfig {
    pub fn new(domain: impl Into<String>) -> Self {
        WorkerConfig {
            domain: domain.into(),
            visibility_timeout: 30,
            default_max_attempts: 3,
            use_notify: true,
            poll_interval: Duration::from_secs(1),
            max_flush: 1000,
            max_unflushed: 1000,
            auto_extend: false,
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    claimed: AtomicU64,
    applied: AtomicU64,
    fenced: AtomicU64,
    flushes: AtomicU64,
    flush_errors: AtomicU64,
    released: AtomicU64,
}

/// A snapshot of the worker's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerStats {
    pub claimed: u64,
    pub applied: u64,
    pub fenced: u64,
    pub flushes: u64,
    pub flush_errors: u64,
    pub released: u64,
    pub in_flight: u64,
    /// Outcomes reported and not yet applied (queued or in the running flush).
    pub unflushed: u64,
    pub last_error: Option<String>,
}

enum FlushMsg {
    Outcome(Outcome),
    Barrier(oneshot::Sender<()>),
}

pub struct WorkerCore {
    engine: Engine,
    cfg: WorkerConfig,
    queue: String,
    /// Leases claimed and not yet reported, keyed by (msg_id, attempt).
    in_flight: Mutex<HashMap<(i64, i32), Uuid>>,
    outcomes: Mutex<Option<mpsc::UnboundedSender<FlushMsg>>>,
    /// Outcomes reported and not yet through `flush_with_retry`.
    unflushed: AtomicUsize,
    /// Notified after every flush (wakes a `next_batch` held back by `max_unflushed`).
    flushed: Notify,
    stop_tx: watch::Sender<bool>,
    wake: Arc<Notify>,
    counters: Arc<Counters>,
    last_error: Arc<Mutex<Option<String>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these short critical sections cannot leave them inconsistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl WorkerCore {
    pub fn new(engine: Engine, cfg: WorkerConfig) -> Arc<Self> {
        let queue = sql::command_queue(&cfg.domain);
        let (stop_tx, _) = watch::channel(false);
        Arc::new(WorkerCore {
            engine,
            cfg,
            queue,
            in_flight: Mutex::new(HashMap::new()),
            outcomes: Mutex::new(None),
            unflushed: AtomicUsize::new(0),
            flushed: Notify::new(),
            stop_tx,
            wake: Arc::new(Notify::new()),
            counters: Arc::new(Counters::default()),
            last_error: Arc::new(Mutex::new(None)),
            tasks: Mutex::new(Vec::new()),
        })
    }

    pub fn config(&self) -> &WorkerConfig {
        &self.cfg
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    fn stopping(&self) -> bool {
        *self.stop_tx.borrow()
    }

    fn note_error(&self, err: &CoreError) {
        *lock(&self.last_error) = Some(err.to_string());
    }

    /// Creates the queue if needed and starts the flusher, the listener and the lease keeper.
    /// Must run inside the tokio runtime.
    pub async fn start(self: &Arc<Self>) -> CoreResult<()> {
        if lock(&self.outcomes).is_some() {
            return Ok(());
        }
        self.engine.ensure_queue(&self.queue).await?;
        self.engine.refresh_statistics().await?;
        let (tx, rx) = mpsc::unbounded_channel();
        *lock(&self.outcomes) = Some(tx);
        let mut tasks = lock(&self.tasks);
        tasks.push(tokio::spawn(Self::flusher(Arc::clone(self), rx)));
        if self.cfg.use_notify {
            tasks.push(tokio::spawn(Self::listener(Arc::clone(self))));
        }
        if self.cfg.auto_extend {
            tasks.push(tokio::spawn(Self::lease_keeper(Arc::clone(self))));
        }
        Ok(())
    }

    fn register(&self, claimed: &[Claimed]) {
        let mut map = lock(&self.in_flight);
        for c in claimed {
            map.insert((c.lease.msg_id, c.lease.attempt), c.lease.command_id);
        }
        self.counters.claimed.fetch_add(claimed.len() as u64, Ordering::Relaxed);
    }

    /// Claims up to `max` commands now, without waiting (the step API's `receive`).
    pub async fn claim_now(&self, max: usize, visibility_timeout: i32) -> CoreResult<Vec<Claimed>> {
        if self.stopping() {
            return Err(CoreError::Closed("worker"));
        }
        let claimed = self
            .engine
            .claim(
                &self.cfg.domain,
                visibility_timeout,
                max.min(i32::MAX as usize) as i32,
                self.cfg.default_max_attempts,
            )
            .await?;
        self.register(&claimed);
        Ok(claimed)
    }

    /// Waits until at least one command can be claimed (NOTIFY wake-up, or polling every
    /// `poll_interval`), claims up to `max`, and returns them; returns an empty batch once the
    /// worker is stopping. Claimed leases are registered before they are returned, so a caller
    /// that goes away cannot lose them: shutdown releases whatever was never reported.
    pub async fn next_batch(&self, max: usize) -> CoreResult<Vec<Claimed>> {
        let mut stop_rx = self.stop_tx.subscribe();
        loop {
            if *stop_rx.borrow_and_update() {
                return Ok(Vec::new());
            }
            // Backpressure: no new leases while the flusher is behind.
            let flushed = self.flushed.notified();
            if self.unflushed.load(Ordering::Acquire) > self.cfg.max_unflushed {
                tokio::select! {
                    _ = flushed => {}
                    // A flush ends with notify_waiters; re-check now and then regardless.
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stop_rx.changed() => {}
                }
                continue;
            }
            let claimed = self.claim_now(max, self.cfg.visibility_timeout).await?;
            if !claimed.is_empty() {
                return Ok(claimed);
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.cfg.poll_interval) => {}
                _ = stop_rx.changed() => {}
            }
        }
    }

    fn take_lease(&self, msg_id: i64, attempt: i32) -> Option<Lease> {
        lock(&self.in_flight)
            .remove(&(msg_id, attempt))
            .map(|command_id| Lease {
                command_id,
                msg_id,
                attempt,
            })
    }

    pub fn lease(&self, msg_id: i64, attempt: i32) -> Option<Lease> {
        lock(&self.in_flight).get(&(msg_id, attempt)).map(|&command_id| Lease {
            command_id,
            msg_id,
            attempt,
        })
    }

    /// Queues an outcome for the next flush. Returns false when this worker holds no such lease
    /// (already reported, or released).
    pub fn report(&self, mut outcome: Outcome) -> CoreResult<bool> {
        let sender = lock(&self.outcomes).clone().ok_or(CoreError::Closed("worker"))?;
        let Some(lease) = self.take_lease(outcome.lease.msg_id, outcome.lease.attempt) else {
            return Ok(false);
        };
        outcome.lease = lease;
        self.unflushed.fetch_add(1, Ordering::AcqRel);
        if sender.send(FlushMsg::Outcome(outcome)).is_err() {
            self.unflushed.fetch_sub(1, Ordering::AcqRel);
            return Err(CoreError::Closed("worker"));
        }
        Ok(true)
    }

    /// Applies one outcome now and returns whether the fence let it through (the step API).
    pub async fn finish_now(&self, mut outcome: Outcome) -> CoreResult<bool> {
        let Some(lease) = self.take_lease(outcome.lease.msg_id, outcome.lease.attempt) else {
            return Ok(false);
        };
        outcome.lease = lease;
        let applied = self
            .engine
            .finish(&self.cfg.domain, vec![outcome], self.cfg.default_max_attempts)
            .await?;
        Ok(!applied.is_empty())
    }

    /// Extends one held lease by `seconds`; false when the lease is no longer ours.
    pub async fn extend(&self, msg_id: i64, attempt: i32, seconds: i32) -> CoreResult<bool> {
        let Some(lease) = self.lease(msg_id, attempt) else {
            return Ok(false);
        };
        Ok(self.engine.extend(&self.cfg.domain, &[lease], seconds).await? > 0)
    }

    /// Waits until every outcome reported so far has been applied (or given up on).
    pub async fn flush(&self) -> CoreResult<()> {
        let sender = lock(&self.outcomes).clone();
        if let Some(sender) = sender {
            let (tx, rx) = oneshot::channel();
            if sender.send(FlushMsg::Barrier(tx)).is_ok() {
                let _ = rx.await;
            }
        }
        Ok(())
    }

    /// First step of a stop: `next_batch` returns at once (empty) and claims no more; outcomes
    /// can still be reported until `shutdown`.
    pub fn stop_claiming(&self) {
        self.stop_tx.send_replace(true);
        self.wake.notify_waiters();
    }

    /// The graceful-stop sequence: stop claiming, apply every reported outcome, release the
    /// leases whose outcome never came (unstarted or abandoned handlers), stop the tasks, close
    /// the pool. Returns how many leases were released.
    pub async fn shutdown(&self) -> CoreResult<i32> {
        self.stop_claiming();
        self.flush().await?;
        let leases: Vec<Lease> = lock(&self.in_flight)
            .drain()
            .map(|((msg_id, attempt), command_id)| Lease {
                command_id,
                msg_id,
                attempt,
            })
            .collect();
        let released = self.engine.release(&self.cfg.domain, &leases).await;
        lock(&self.outcomes).take();
        let tasks: Vec<JoinHandle<()>> = lock(&self.tasks).drain(..).collect();
        for t in tasks {
            let _ = t.await;
        }
        self.engine.close().await;
        let released = released?;
        self.counters
            .released
            .fetch_add(released.max(0) as u64, Ordering::Relaxed);
        Ok(released)
    }

    pub fn stats(&self) -> WorkerStats {
        let c = &self.counters;
        WorkerStats {
            claimed: c.claimed.load(Ordering::Relaxed),
            applied: c.applied.load(Ordering::Relaxed),
            fenced: c.fenced.load(Ordering::Relaxed),
            flushes: c.flushes.load(Ordering::Relaxed),
            flush_errors: c.flush_errors.load(Ordering::Relaxed),
            released: c.released.load(Ordering::Relaxed),
            in_flight: lock(&self.in_flight).len() as u64,
            unflushed: self.unflushed.load(Ordering::Acquire) as u64,
            last_error: lock(&self.last_error).clone(),
        }
    }

    /// Applies outcomes in batches: takes everything queued (up to `max_flush`) while the
    /// previous flush ran, so the batch size follows the load with no added latency.
    async fn flusher(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<FlushMsg>) {
        let max = self.cfg.max_flush.max(1);
        while let Some(first) = rx.recv().await {
            let mut batch = Vec::new();
            let mut barriers = Vec::new();
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match msg {
                    FlushMsg::Outcome(o) => batch.push(o),
                    FlushMsg::Barrier(b) => barriers.push(b),
                }
                if batch.len() < max {
                    next = rx.try_recv().ok();
                }
            }
            if !batch.is_empty() {
                let n = batch.len();
                self.flush_with_retry(batch).await;
                self.unflushed.fetch_sub(n, Ordering::AcqRel);
                self.flushed.notify_waiters();
            }
            for b in barriers {
                let _ = b.send(());
            }
        }
    }

    async fn flush_with_retry(&self, batch: Vec<Outcome>) {
        let n = batch.len() as u64;
        let mut delay = Duration::from_millis(50);
        // About a minute of retries: past that the leases have expired anyway and the commands
        // come back to a worker, so giving up loses nothing (the fence rejects late outcomes).
        for _ in 0..40 {
            match self
                .engine
                .finish(&self.cfg.domain, batch.clone(), self.cfg.default_max_attempts)
                .await
            {
                Ok(applied) => {
                    let c = &self.counters;
                    c.flushes.fetch_add(1, Ordering::Relaxed);
                    c.applied.fetch_add(applied.len() as u64, Ordering::Relaxed);
                    c.fenced
                        .fetch_add(n.saturating_sub(applied.len() as u64), Ordering::Relaxed);
                    return;
                }
                Err(err) => {
                    self.counters.flush_errors.fetch_add(1, Ordering::Relaxed);
                    self.note_error(&err);
                    if matches!(err, CoreError::Closed(_)) {
                        return;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    async fn listener(self: Arc<Self>) {
        let channel = sql::notify_channel(&self.queue);
        let mut stop_rx = self.stop_tx.subscribe();
        while !*stop_rx.borrow_and_update() {
            let mut listener = match self.engine.listener(&channel).await {
                Ok(l) => l,
                Err(err) => {
                    self.note_error(&err);
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = stop_rx.changed() => return,
                    }
                }
            };
            loop {
                tokio::select! {
                    n = listener.recv() => match n {
                        Ok(_) => self.wake.notify_one(),
                        Err(err) => { self.note_error(&CoreError::from(err)); break; }
                    },
                    _ = stop_rx.changed() => return,
                }
            }
        }
    }

    async fn lease_keeper(self: Arc<Self>) {
        let vt = self.cfg.visibility_timeout.max(3);
        let period = Duration::from_secs((vt / 3) as u64);
        let mut stop_rx = self.stop_tx.subscribe();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = stop_rx.changed() => return,
            }
            let leases: Vec<Lease> = lock(&self.in_flight)
                .iter()
                .map(|(&(msg_id, attempt), &command_id)| Lease {
                    command_id,
                    msg_id,
                    attempt,
                })
                .collect();
            if let Err(err) = self.engine.extend(&self.cfg.domain, &leases, vt).await {
                self.note_error(&err);
            }
        }
    }
}
