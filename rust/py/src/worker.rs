//! NativeWorker: the Rust side of `Worker`. Claimed batches cross into Python in one conversion;
//! outcomes come back through `report`, which only pushes into the flusher's channel.

use std::sync::Arc;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::PyDict;
use rcmd_core::{CoreResult, Engine, EngineConfig, Lease, Outcome, OutcomeKind, WorkerConfig, WorkerCore};
use uuid::Uuid;

use crate::bridge::{Completions, Ready};
use crate::errors::to_pyerr;
use crate::runtime::runtime;

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

#[allow(clippy::too_many_arguments)]
fn outcome(
    msg_id: i64,
    attempt: i32,
    kind: &str,
    result: Option<String>,
    error_type: Option<String>,
    error_code: Option<String>,
    error_msg: Option<String>,
    error_details: Option<String>,
    backoff: i32,
) -> PyResult<Outcome> {
    Ok(Outcome {
        // The command id is filled in from the held lease.
        lease: Lease {
            command_id: Uuid::nil(),
            msg_id,
            attempt,
        },
        kind: OutcomeKind::parse(kind).map_err(|e| to_pyerr(e, None))?,
        result,
        error_type,
        error_code,
        error_msg,
        error_details,
        backoff,
    })
}

#[pymethods]
impl NativeWorker {
    #[new]
    #[pyo3(signature = (dsn, domain, visibility_timeout = 30, default_max_attempts = 3, use_notify = true,
                        poll_interval = 1.0, max_flush = 1000, auto_extend = false, max_connections = 4,
                        max_unflushed = 1000))]
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
        max_unflushed: usize,
    ) -> PyResult<Self> {
        let rt = runtime()?;
        let _guard = rt.enter();
        let mut ecfg = EngineConfig::new(dsn);
        ecfg.max_connections = max_connections.max(3);
        ecfg.application_name = format!("rcmd-worker:{domain}");
        let engine = Engine::connect_lazy(&ecfg).map_err(|e| to_pyerr(e, Some(&domain)))?;
        let mut cfg = WorkerConfig::new(domain);
        cfg.visibility_timeout = visibility_timeout;
        cfg.default_max_attempts = default_max_attempts;
        cfg.use_notify = use_notify;
        cfg.poll_interval = Duration::from_secs_f64(poll_interval.max(0.001));
        cfg.max_flush = max_flush;
        cfg.max_unflushed = max_unflushed;
        cfg.auto_extend = auto_extend;
        Ok(NativeWorker {
            core: WorkerCore::new(engine, cfg),
        })
    }

    fn start(&self, completions: &Completions) -> PyResult<u64> {
        let core = Arc::clone(&self.core);
        completions.spawn(async move { ready(core.start().await, &core.config().domain, |()| Ready::Unit) })
    }

    /// Waits for work and claims up to `max` commands; empty once the worker is stopping.
    fn next_batch(&self, completions: &Completions, max: usize) -> PyResult<u64> {
        let core = Arc::clone(&self.core);
        completions.spawn(async move { ready(core.next_batch(max).await, &core.config().domain, Ready::Claimed) })
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

    /// Queues an outcome for the next flush (no I/O, no waiting). False if the lease is not held.
    #[pyo3(signature = (msg_id, attempt, kind, result=None, error_type=None, error_code=None, error_msg=None, error_details=None, backoff=0))]
    #[allow(clippy::too_many_arguments)]
    fn report(
        &self,
        msg_id: i64,
        attempt: i32,
        kind: &str,
        result: Option<String>,
        error_type: Option<String>,
        error_code: Option<String>,
        error_msg: Option<String>,
        error_details: Option<String>,
        backoff: i32,
    ) -> PyResult<bool> {
        let o = outcome(
            msg_id,
            attempt,
            kind,
            result,
            error_type,
            error_code,
            error_msg,
            error_details,
            backoff,
        )?;
        self.core.report(o).map_err(|e| to_pyerr(e, None))
    }

    /// Applies one outcome now (step API); resolves to whether the fence let it through.
    #[pyo3(signature = (completions, msg_id, attempt, kind, result=None, error_type=None, error_code=None, error_msg=None, error_details=None, backoff=0))]
    #[allow(clippy::too_many_arguments)]
    fn finish_now(
        &self,
        completions: &Completions,
        msg_id: i64,
        attempt: i32,
        kind: &str,
        result: Option<String>,
        error_type: Option<String>,
        error_code: Option<String>,
        error_msg: Option<String>,
        error_details: Option<String>,
        backoff: i32,
    ) -> PyResult<u64> {
        let o = outcome(
            msg_id,
            attempt,
            kind,
            result,
            error_type,
            error_code,
            error_msg,
            error_details,
            backoff,
        )?;
        let core = Arc::clone(&self.core);
        completions.spawn(async move { ready(core.finish_now(o).await, &core.config().domain, Ready::Bool) })
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

    /// Graceful stop: flush, release unreported leases, close. Resolves to the released count.
    fn shutdown(&self, completions: &Completions) -> PyResult<u64> {
        let core = Arc::clone(&self.core);
        completions.spawn(async move { ready(core.shutdown().await, &core.config().domain, Ready::Int) })
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
        d.set_item("in_flight", s.in_flight)?;
        d.set_item("unflushed", s.unflushed)?;
        d.set_item("last_error", s.last_error)?;
        Ok(d)
    }
}
