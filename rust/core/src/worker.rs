//! The worker's hot path: the claim loop (in `claim_loop.rs`: slot accounting, claims in flight,
//! backpressure, NOTIFY wake-up with polling fallback, claim retries), lease tracking, lease
//! keeper, outcome flusher, background-failure events and the shutdown sequence. Python only
//! runs handlers: it awaits `next_batch`, and reports each outcome with `report`, a
//! non-blocking push into a channel that frees the command's slot.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::engine::{Claimed, Engine};
use crate::error::{CoreError, CoreResult};
use crate::events::{EventKind, Events, WorkerEvent};
use crate::outcome::{Lease, Outcome, Report};
use crate::sql;

mod claim_loop;
mod outcome_metrics;

pub use outcome_metrics::{kind_index, Histogram, TypeOutcomes, OUTCOME_KINDS};
use outcome_metrics::{OutcomeMetrics, NO_TYPE};

/// Outcomes allowed to wait for their flush before claims pause, at least: a small worker
/// keeps claiming while one flush runs.
const MIN_UNFLUSHED: usize = 64;
/// The listener checks that its connection still answers this often (a connection that went
/// silent is replaced; until then polling finds the work).
const LISTENER_CHECK: Duration = Duration::from_secs(5);

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
    /// Handlers that run at once: leases claimed and not yet reported (running, or claimed and
    /// waiting to be taken) plus those being claimed never exceed it.
    pub concurrency: usize,
    /// Claims pause while more outcomes than this wait for their flush, so the leases a worker
    /// holds stay bounded when the database applies outcomes more slowly than handlers produce
    /// them (unbounded, the claimed-but-unfinished messages piled up, every claim had to scan
    /// past them, and their leases could expire into redeliveries).
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
            concurrency: 1,
            max_unflushed: MIN_UNFLUSHED,
            auto_extend: false,
        }
    }

    /// Sets the concurrency and the backpressure threshold that goes with it: an outcome counts
    /// as in flight until it is applied, so claims cannot outrun a slow database.
    pub fn with_concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self.max_unflushed = self.concurrency.max(MIN_UNFLUSHED);
        self
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
    /// Claim statements that answered, and their summed latency: metrics read them at scrape
    /// time (a few relaxed atomic adds per claim or flush, nothing per command).
    claims: AtomicU64,
    claim_micros: AtomicU64,
    flush_micros: AtomicU64,
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
    /// Claim statements that answered (empty ones included) and their summed latency.
    pub claims: u64,
    pub claim_micros: u64,
    /// Summed latency of the successful flushes (`flushes` of them).
    pub flush_micros: u64,
    pub in_flight: u64,
    /// Outcomes reported and not yet applied (queued or in the running flush).
    pub unflushed: u64,
    pub last_error: Option<String>,
}

/// A lease this worker holds: its command, and for outcome metrics (when on) the index of its
/// command type and when it was handed to the handlers.
#[derive(Debug, Clone, Copy)]
struct Held {
    command_id: Uuid,
    created_at_us: i64,
    type_index: u32,
    since: Option<Instant>,
}

enum FlushMsg {
    Report(Report),
    Barrier(oneshot::Sender<()>),
}

pub struct WorkerCore {
    engine: Engine,
    cfg: WorkerConfig,
    queue: String,
    /// Leases claimed and not yet reported, keyed by (msg_id, attempt): the slots in use.
    in_flight: Mutex<HashMap<(i64, i32), Held>>,
    /// Slots reserved by the claims in flight.
    reserved: AtomicUsize,
    /// Claimed batches (or claim failures) not yet taken by `next_batch`.
    ready: Mutex<VecDeque<CoreResult<Vec<Claimed>>>>,
    batch_ready: Notify,
    /// Notified by `report` when enough slots are free for a claim.
    slot_freed: Notify,
    outcomes: Mutex<Option<mpsc::UnboundedSender<FlushMsg>>>,
    /// Outcomes reported and not yet through `flush_with_retry`.
    unflushed: AtomicUsize,
    /// Notified after every flush (wakes a claim held back by `max_unflushed`).
    flushed: Notify,
    stop_tx: watch::Sender<bool>,
    /// NOTIFY from the queue: messages arrived.
    wake: Notify,
    started: AtomicBool,
    events: Events,
    counters: Counters,
    /// Outcome metrics, when enabled (`metrics_on`): one short lock per handed-out batch and
    /// per report.
    metrics_on: AtomicBool,
    outcome_metrics: Mutex<Option<OutcomeMetrics>>,
    last_error: Mutex<Option<String>>,
    claim_loop: Mutex<Option<JoinHandle<()>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// Runs `fut` to its end, or for at most `left` (None: no limit); None when the time ran out.
async fn within<F: std::future::Future>(left: Option<Duration>, fut: F) -> Option<F::Output> {
    match left {
        None => Some(fut.await),
        Some(left) => tokio::time::timeout(left, fut).await.ok(),
    }
}

fn micros_since(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX)
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
            reserved: AtomicUsize::new(0),
            ready: Mutex::new(VecDeque::new()),
            batch_ready: Notify::new(),
            slot_freed: Notify::new(),
            outcomes: Mutex::new(None),
            unflushed: AtomicUsize::new(0),
            flushed: Notify::new(),
            stop_tx,
            wake: Notify::new(),
            started: AtomicBool::new(false),
            events: Events::default(),
            counters: Counters::default(),
            metrics_on: AtomicBool::new(false),
            outcome_metrics: Mutex::new(None),
            last_error: Mutex::new(None),
            claim_loop: Mutex::new(None),
            tasks: Mutex::new(Vec::new()),
        })
    }

    pub fn config(&self) -> &WorkerConfig {
        &self.cfg
    }

    fn stopping(&self) -> bool {
        *self.stop_tx.borrow()
    }

    fn note_error(&self, err: &CoreError) {
        *lock(&self.last_error) = Some(err.to_string());
    }

    /// Creates the queue if needed and starts the flusher, the listener and the lease keeper.
    /// Must run inside the tokio runtime. The claim loop starts with the first `next_batch`, so
    /// a caller that claims with `claim_now` (the step API) holds only what it asked for.
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
        self.started.store(true, Ordering::Release);
        Ok(())
    }

    fn register(&self, claimed: &[Claimed]) {
        let mut map = lock(&self.in_flight);
        for c in claimed {
            let held = Held {
                command_id: c.lease.command_id,
                created_at_us: c.lease.created_at_us,
                type_index: NO_TYPE,
                since: None,
            };
            map.insert((c.lease.msg_id, c.lease.attempt), held);
        }
        self.counters.claimed.fetch_add(claimed.len() as u64, Ordering::Relaxed);
    }

    /// Claims up to `max` commands now, without waiting (the step API's `receive`, and each
    /// claim of the loop).
    pub async fn claim_now(&self, max: usize, visibility_timeout: i32) -> CoreResult<Vec<Claimed>> {
        if self.stopping() {
            return Err(CoreError::Closed("worker"));
        }
        let started = Instant::now();
        let claimed = self
            .engine
            .claim(
                &self.cfg.domain,
                visibility_timeout,
                max.min(i32::MAX as usize) as i32,
                self.cfg.default_max_attempts,
            )
            .await?;
        let c = &self.counters;
        c.claims.fetch_add(1, Ordering::Relaxed);
        c.claim_micros.fetch_add(micros_since(started), Ordering::Relaxed);
        self.register(&claimed);
        Ok(claimed)
    }

    /// The next problem worth a log line (flush or lease extension failures, repeats folded
    /// into one with a count); None once the worker is shut down and nothing is left.
    pub async fn next_event(&self) -> Option<WorkerEvent> {
        self.events.next().await
    }

    /// Removes a held lease; also returns how many are held after it.
    /// With outcome metrics on, the lease's outcome counts as `kind` (None: not an outcome,
    /// e.g. a release).
    fn take_lease(&self, msg_id: i64, attempt: i32, kind: Option<usize>) -> (Option<Lease>, usize) {
        let mut map = lock(&self.in_flight);
        let held = map.remove(&(msg_id, attempt));
        let n = map.len();
        drop(map);
        let lease = held.map(|h| {
            if let (true, Some(since)) = (h.type_index != NO_TYPE, h.since) {
                self.count_outcome(h.type_index, kind, since.elapsed());
            }
            Lease {
                command_id: h.command_id,
                created_at_us: h.created_at_us,
                msg_id,
                attempt,
            }
        });
        (lease, n)
    }

    fn count_outcome(&self, type_index: u32, kind: Option<usize>, took: Duration) {
        if let Some(kind) = kind {
            if let Some(m) = lock(&self.outcome_metrics).as_mut() {
                m.observe_outcome(type_index, kind, took);
            }
        }
    }

    /// Starts counting outcome metrics (per command type: outcomes by kind, handler time and
    /// queue wait, into histograms with these upper bounds, in seconds) from the next batch
    /// handed out; `take_outcome_metrics` reads them.
    pub fn enable_outcome_metrics(&self, duration_bounds: Vec<f64>, wait_bounds: Vec<f64>) -> CoreResult<()> {
        let m = OutcomeMetrics::new(duration_bounds, wait_bounds)?;
        *lock(&self.outcome_metrics) = Some(m);
        self.metrics_on.store(true, Ordering::Release);
        Ok(())
    }

    /// What the outcome metrics counted since the last call (empty when they are off).
    pub fn take_outcome_metrics(&self) -> Vec<TypeOutcomes> {
        lock(&self.outcome_metrics)
            .as_mut()
            .map(OutcomeMetrics::take)
            .unwrap_or_default()
    }

    /// A claimed batch leaves for the handlers: with outcome metrics on, its leases learn their
    /// command type and the time (first attempts also count their queue wait).
    fn handing_out(&self, batch: &[Claimed]) {
        if !self.metrics_on.load(Ordering::Acquire) || batch.is_empty() {
            return;
        }
        let indexes: Vec<u32> = {
            let mut guard = lock(&self.outcome_metrics);
            let Some(m) = guard.as_mut() else { return };
            let now = std::time::SystemTime::now();
            batch
                .iter()
                .map(|c| {
                    let i = m.type_index(&c.command_type);
                    if c.lease.attempt == 1 {
                        m.observe_wait(i, c.lease.created_at_us, now);
                    }
                    i
                })
                .collect()
        };
        let now = Instant::now();
        let mut map = lock(&self.in_flight);
        for (c, i) in batch.iter().zip(indexes) {
            if let Some(h) = map.get_mut(&(c.lease.msg_id, c.lease.attempt)) {
                h.type_index = i;
                h.since = Some(now);
            }
        }
    }

    pub fn lease(&self, msg_id: i64, attempt: i32) -> Option<Lease> {
        lock(&self.in_flight).get(&(msg_id, attempt)).map(|h| Lease {
            command_id: h.command_id,
            created_at_us: h.created_at_us,
            msg_id,
            attempt,
        })
    }

    /// Queues an outcome for the next flush; its slot is free from now on. Returns false when
    /// this worker holds no such lease (already reported, or released).
    pub fn report(&self, msg_id: i64, attempt: i32, outcome: Outcome) -> CoreResult<bool> {
        let sender = lock(&self.outcomes).clone().ok_or(CoreError::Closed("worker"))?;
        let (Some(lease), held) = self.take_lease(msg_id, attempt, Some(kind_index(&outcome))) else {
            return Ok(false);
        };
        self.unflushed.fetch_add(1, Ordering::AcqRel);
        if sender.send(FlushMsg::Report(Report { lease, outcome })).is_err() {
            self.unflushed.fetch_sub(1, Ordering::AcqRel);
            return Err(CoreError::Closed("worker"));
        }
        if self.claim_size(held).is_some() {
            self.slot_freed.notify_one();
        }
        Ok(true)
    }

    /// Applies one outcome now and returns whether the fence let it through (the step API).
    pub async fn finish_now(&self, msg_id: i64, attempt: i32, outcome: Outcome) -> CoreResult<bool> {
        let (Some(lease), _) = self.take_lease(msg_id, attempt, Some(kind_index(&outcome))) else {
            return Ok(false);
        };
        let applied = self
            .engine
            .finish(
                &self.cfg.domain,
                vec![Report { lease, outcome }],
                self.cfg.default_max_attempts,
            )
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

    /// First step of a stop: claims end, `next_batch` returns at once (empty); outcomes can
    /// still be reported until `shutdown`.
    pub fn stop_claiming(&self) {
        self.stop_tx.send_replace(true);
        self.wake.notify_waiters();
    }

    /// The graceful-stop sequence: stop claiming, wait for the claims in flight, apply every
    /// reported outcome, release the leases whose outcome never came (batches never taken,
    /// abandoned handlers), stop the tasks, close the pool. Returns how many leases were
    /// released.
    ///
    /// With a `budget`, the whole sequence ends within it even when the database does not
    /// answer: each step gets what is left (claims and a flush still running are aborted, the
    /// release is skipped when no time is left). Nothing is lost by that: an outcome not applied
    /// and a lease not released come back when the lease expires, the command is redelivered,
    /// and the fence rejects a late duplicate.
    pub async fn shutdown(&self, budget: Option<Duration>) -> CoreResult<i32> {
        let until = budget.map(|b| tokio::time::Instant::now() + b);
        let left = || until.map(|u| u.saturating_duration_since(tokio::time::Instant::now()));
        self.stop_claiming();
        let claim_loop = lock(&self.claim_loop).take();
        if let Some(mut handle) = claim_loop {
            if within(left(), &mut handle).await.is_none() {
                handle.abort();
                self.reserved.store(0, Ordering::Release);
            }
        }
        let flushed = within(left(), self.flush()).await.is_some();
        if !flushed {
            self.note_error(&CoreError::Connection(
                "stop: outcomes not flushed within the stop timeout (they are redelivered)".into(),
            ));
        }
        lock(&self.ready).clear();
        let leases: Vec<Lease> = lock(&self.in_flight)
            .drain()
            .map(|((msg_id, attempt), h)| Lease {
                command_id: h.command_id,
                created_at_us: h.created_at_us,
                msg_id,
                attempt,
            })
            .collect();
        let released = match within(left(), self.engine.release(&self.cfg.domain, &leases)).await {
            Some(released) => released,
            None => Err(CoreError::Connection(
                "stop: leases not released within the stop timeout (they expire)".into(),
            )),
        };
        lock(&self.outcomes).take();
        let tasks: Vec<JoinHandle<()>> = lock(&self.tasks).drain(..).collect();
        for mut t in tasks {
            if within(left(), &mut t).await.is_none() {
                t.abort();
            }
        }
        // Closing waits for connections in use to come back: bounded as the rest.
        let _ = within(left(), self.engine.close()).await;
        self.events.close();
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
            claims: c.claims.load(Ordering::Relaxed),
            claim_micros: c.claim_micros.load(Ordering::Relaxed),
            flush_micros: c.flush_micros.load(Ordering::Relaxed),
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
                    FlushMsg::Report(r) => batch.push(r),
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

    async fn flush_with_retry(&self, batch: Vec<Report>) {
        let n = batch.len() as u64;
        let mut delay = Duration::from_millis(50);
        // About a minute of retries: past that the leases have expired anyway and the commands
        // come back to a worker, so giving up loses nothing (the fence rejects late outcomes).
        for _ in 0..40 {
            let started = Instant::now();
            match self
                .engine
                .finish(&self.cfg.domain, batch.clone(), self.cfg.default_max_attempts)
                .await
            {
                Ok(applied) => {
                    let c = &self.counters;
                    c.flushes.fetch_add(1, Ordering::Relaxed);
                    c.flush_micros.fetch_add(micros_since(started), Ordering::Relaxed);
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
                    self.events.push(EventKind::FlushFailed, err.to_string());
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
                    // Polling still finds the work; only the wake-up is late.
                    self.note_error(&err);
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = stop_rx.changed() => return,
                    }
                }
            };
            let mut check = tokio::time::interval(LISTENER_CHECK);
            check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            check.tick().await;
            loop {
                tokio::select! {
                    n = listener.recv() => match n {
                        Ok(_) => self.wake.notify_one(),
                        Err(err) => { self.note_error(&CoreError::from(err)); break; }
                    },
                    _ = check.tick() => {
                        // A connection that went silent never fails `recv`: ask it something.
                        if let Err(err) = self.engine.check_listener(&mut listener).await {
                            self.note_error(&err);
                            break;
                        }
                    }
                    _ = stop_rx.changed() => return,
                }
            }
            // Messages may have arrived unheard: claim once more now.
            self.wake.notify_one();
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
                .map(|(&(msg_id, attempt), h)| Lease {
                    command_id: h.command_id,
                    created_at_us: h.created_at_us,
                    msg_id,
                    attempt,
                })
                .collect();
            if let Err(err) = self.engine.extend(&self.cfg.domain, &leases, vt).await {
                self.note_error(&err);
                self.events.push(EventKind::LeaseExtensionFailed, err.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineConfig;

    pub(super) fn core(concurrency: usize) -> Arc<WorkerCore> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let engine = Engine::connect_lazy(&EngineConfig::new("postgresql://nobody@127.0.0.1:1/none")).unwrap();
        WorkerCore::new(engine, WorkerConfig::new("orders").with_concurrency(concurrency))
    }

    #[test]
    fn backpressure_follows_concurrency() {
        assert_eq!(WorkerConfig::new("d").with_concurrency(8).max_unflushed, 64);
        assert_eq!(WorkerConfig::new("d").with_concurrency(1024).max_unflushed, 1024);
        assert_eq!(WorkerConfig::new("d").with_concurrency(0).concurrency, 1);
    }

    #[test]
    fn next_batch_needs_start() {
        let c = core(4);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        assert!(matches!(rt.block_on(c.next_batch()), Err(CoreError::Invalid { .. })));
    }
}
