//! NativeWorker: the Rust side of `Worker`. The core's claim loop hands out claimed batches, each
//! crossing into Python in one conversion; outcomes come back through `report`, which only
//! pushes into the flusher's channel.

use std::sync::Arc;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::PyDict;
use rcmd_core::{CoreResult, Engine, EngineConfig, WorkerConfig, WorkerCore};

use crate::bridge::{Completions, Ready};
use crate::errors::to_pyerr;
use crate::outcome::Outcome;
use crate::runtime::runtime;

/// A positive number of seconds as a Duration (the deadlines of the engine).
pub(crate) fn seconds(field: &'static str, value: f64) -> PyResult<Duration> {
    if !value.is_finite() || value <= 0.0 || value > 1e6 {
        return Err(to_pyerr(
            rcmd_core::CoreError::Invalid {
                field,
                reason: format!("{value} (must be a number of seconds > 0)"),
            },
            None,
        ));
    }
    Ok(Duration::from_secs_f64(value))
}

fn ready<T>(result: CoreResult<T>, domain: &str, ok: impl FnOnce(T) -> Ready) -> Ready {
    match result {
        Ok(v) => ok(v),
        Err(e) => Ready::Failed(e, Some(domain.to_owned())),
    }
}

#[pyclass(frozen, module = "commandbus._native")]
pub struct NativeWorker {
    core: Arc<WorkerCore>,
}

#[pymethods]
impl NativeWorker {
    #[new]
    #[pyo3(signature = (dsn, domain, visibility_timeout = 30, default_max_attempts = 3, use_notify = true,
                        poll_interval = 1.0, max_flush = 1000, auto_extend = false, max_connections = 4,
                        concurrency = 1, call_timeout = 10.0, application_name = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        dsn: String,
        domain: String,
        visibility_timeout: i32,
        default_max_attempts: i32,
        use_notify: bool,
        poll_interval: f64,
        max_flush: usize,
        auto_extend: bool,
        max_connections: u32,
        concurrency: usize,
        call_timeout: f64,
        application_name: Option<String>,
    ) -> PyResult<Self> {
        let rt = runtime()?;
        let _guard = rt.enter();
        let mut ecfg = EngineConfig::new(dsn);
        ecfg.max_connections = max_connections.max(3);
        ecfg.application_name = application_name.unwrap_or_else(|| format!("rcmd worker {domain}"));
        ecfg.call_timeout = seconds("call_timeout", call_timeout)?;
        ecfg.acquire_timeout = ecfg.call_timeout;
        let engine = Engine::connect_lazy(&ecfg).map_err(|e| to_pyerr(e, Some(&domain)))?;
        let mut cfg = WorkerConfig::new(domain).with_concurrency(concurrency);
        cfg.visibility_timeout = visibility_timeout;
        cfg.default_max_attempts = default_max_attempts;
        cfg.use_notify = use_notify;
        cfg.poll_interval = Duration::from_secs_f64(poll_interval.max(0.001));
        cfg.max_flush = max_flush;
        cfg.auto_extend = auto_extend;
        Ok(NativeWorker {
            core: WorkerCore::new(engine, cfg),
        })
    }

    fn start(&self, completions: &Completions) -> PyResult<u64> {
        let core = Arc::clone(&self.core);
        completions.spawn(async move { ready(core.start().await, &core.config().domain, |()| Ready::Unit) })
    }

    /// Resolves with the next batch the claim loop claimed (its leases already held); raises
    /// when a claim failed (the loop retries after a backoff); empty once the worker stops.
    fn next_batch(&self, completions: &Completions) -> PyResult<u64> {
        let core = Arc::clone(&self.core);
        completions.spawn(async move { ready(core.next_batch().await, &core.config().domain, Ready::Claimed) })
    }

    /// Resolves with the next background failure as (kind, message, count), kind "flush" or
    /// "extend"; None once the worker is shut down.
    fn next_event(&self, completions: &Completions) -> PyResult<u64> {
        let core = Arc::clone(&self.core);
        completions.spawn(async move { Ready::Event(core.next_event().await) })
    }

    /// Claims up to `max` commands now, without waiting (step API).
    fn receive(&self, completions: &Completions, max: usize, visibility_timeout: i32) -> PyResult<u64> {
        let core = Arc::clone(&self.core);
        completions.spawn(async move {
            ready(
                core.claim_now(max, visibility_timeout).await,
                &core.config().domain,
                Ready::Claimed,
            )
        })
    }

    /// Queues an outcome for the next flush (no I/O, no waiting); its slot is free from now on.
    /// False if the lease is not held.
    fn report(&self, msg_id: i64, attempt: i32, outcome: &Outcome) -> PyResult<bool> {
        self.core
            .report(msg_id, attempt, outcome.inner.clone())
            .map_err(|e| to_pyerr(e, None))
    }

    /// Applies one outcome now (step API); resolves to whether the fence let it through.
    fn finish_now(&self, completions: &Completions, msg_id: i64, attempt: i32, outcome: &Outcome) -> PyResult<u64> {
        let core = Arc::clone(&self.core);
        let outcome = outcome.inner.clone();
        completions.spawn(async move {
            ready(
                core.finish_now(msg_id, attempt, outcome).await,
                &core.config().domain,
                Ready::Bool,
            )
        })
    }

    /// Extends a held lease by `seconds`; resolves to False when the lease is no longer ours.
    fn extend(&self, completions: &Completions, msg_id: i64, attempt: i32, seconds: i32) -> PyResult<u64> {
        let core = Arc::clone(&self.core);
        completions.spawn(async move {
            ready(
                core.extend(msg_id, attempt, seconds).await,
                &core.config().domain,
                Ready::Bool,
            )
        })
    }

    /// Resolves once every outcome reported so far has been applied.
    fn flush(&self, completions: &Completions) -> PyResult<u64> {
        let core = Arc::clone(&self.core);
        completions.spawn(async move { ready(core.flush().await, &core.config().domain, |()| Ready::Unit) })
    }

    /// Stops claiming: a pending `next_batch` resolves (empty) at once. Reports still work.
    fn stop_claiming(&self) {
        self.core.stop_claiming();
    }

    /// Graceful stop: flush, release unreported leases, close. Resolves to the released count,
    /// within `timeout` seconds (None: no limit) even when the database does not answer.
    #[pyo3(signature = (completions, timeout = None))]
    fn shutdown(&self, completions: &Completions, timeout: Option<f64>) -> PyResult<u64> {
        let budget = timeout.map(|t| Duration::from_secs_f64(t.clamp(0.0, 1e9)));
        let core = Arc::clone(&self.core);
        completions.spawn(async move { ready(core.shutdown(budget).await, &core.config().domain, Ready::Int) })
    }

    /// Counts outcome metrics in the engine from the next batch handed out: per command type,
    /// outcomes by kind, handler time (hand-off to report) and queue wait (send to hand-off of
    /// the first attempt), in histograms with these upper bounds (seconds; +Inf added).
    fn enable_outcome_metrics(&self, duration_bounds: Vec<f64>, wait_bounds: Vec<f64>) -> PyResult<()> {
        self.core
            .enable_outcome_metrics(duration_bounds, wait_bounds)
            .map_err(|e| to_pyerr(e, None))
    }

    /// What the outcome metrics counted since the last call: one tuple per command type with
    /// news, `(command_type, kinds, duration_buckets, duration_sum, wait_buckets, wait_sum)`;
    /// `kinds` counts SUCCESS, BUSINESS_RULE, RETRY, EXHAUSTED, PERMANENT in that order and a
    /// histogram's buckets are per bucket (not cumulative), one per bound and +Inf.
    #[allow(clippy::type_complexity)]
    fn take_outcome_metrics(&self) -> Vec<(String, [u64; 5], Vec<u64>, f64, Vec<u64>, f64)> {
        self.core
            .take_outcome_metrics()
            .into_iter()
            .map(|t| {
                (
                    t.command_type,
                    t.kinds,
                    t.duration.buckets,
                    t.duration.sum,
                    t.wait.buckets,
                    t.wait.sum,
                )
            })
            .collect()
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.core.stats();
        let d = PyDict::new(py);
        d.set_item("claimed", s.claimed)?;
        d.set_item("applied", s.applied)?;
        d.set_item("fenced", s.fenced)?;
        d.set_item("flushes", s.flushes)?;
        d.set_item("flush_errors", s.flush_errors)?;
        d.set_item("released", s.released)?;
        d.set_item("claims", s.claims)?;
        d.set_item("claim_micros", s.claim_micros)?;
        d.set_item("flush_micros", s.flush_micros)?;
        d.set_item("in_flight", s.in_flight)?;
        d.set_item("unflushed", s.unflushed)?;
        d.set_item("last_error", s.last_error)?;
        Ok(d)
    }
}
