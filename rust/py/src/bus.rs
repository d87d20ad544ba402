//! NativeBus: the Rust send path of `CommandBus`.

use pyo3::prelude::*;
use rcmd_core::{Engine, EngineConfig, SendBatch, SendUnit};
use uuid::Uuid;

use crate::bridge::{Completions, Ready};
use crate::errors::to_pyerr;
use crate::runtime::runtime;

/// (domain, command_ids, command_types, messages, correlation_ids, reply_tos, max_attempts,
///  batch_ids): one unit of `send_ordered`.
type UnitColumns = (
    String,
    Vec<Uuid>,
    Vec<String>,
    Vec<String>,
    Vec<Uuid>,
    Vec<Option<String>>,
    Vec<Option<i32>>,
    Vec<Option<Uuid>>,
);

/// The engine's form of one unit's columns.
fn unit(
    (domain, command_ids, command_types, messages, correlation_ids, reply_tos, max_attempts, batch_ids): UnitColumns,
) -> SendUnit {
    let batch = SendBatch {
        command_ids,
        command_types,
        messages,
        correlation_ids,
        reply_tos,
        max_attempts,
        batch_ids,
    };
    (domain, batch)
}

#[pyclass(frozen, module = "commandbus._native")]
pub struct NativeBus {
    engine: Engine,
}

#[pymethods]
impl NativeBus {
    #[new]
    #[pyo3(signature = (dsn, max_connections = 10, call_timeout = 10.0, application_name = None))]
    fn new(dsn: String, max_connections: u32, call_timeout: f64, application_name: Option<String>) -> PyResult<Self> {
        let rt = runtime()?;
        let _guard = rt.enter();
        let mut cfg = EngineConfig::new(dsn);
        cfg.max_connections = max_connections;
        cfg.application_name = application_name.unwrap_or_else(|| "rcmd bus".into());
        cfg.call_timeout = crate::worker::seconds("call_timeout", call_timeout)?;
        cfg.acquire_timeout = cfg.call_timeout;
        let engine = Engine::connect_lazy(&cfg).map_err(|e| to_pyerr(e, None))?;
        Ok(NativeBus { engine })
    }

    /// Sends one unit (a domain's columns, as `send_ordered` takes each) atomically; resolves
    /// to its msg_ids, in input order.
    fn send(&self, completions: &Completions, columns: UnitColumns) -> PyResult<u64> {
        let engine = self.engine.clone();
        let (domain, batch) = unit(columns);
        completions.spawn(async move {
            match engine.send(&domain, batch).await {
                Ok(msg_ids) => Ready::Sent(msg_ids),
                Err(e) => Ready::Failed(e, Some(domain)),
            }
        })
    }

    /// Sends units (one domain's columns each) in order, each atomically,
    /// up to `depth` statements at once with commits in unit order (`Engine::send_ordered`);
    /// resolves to each unit's msg_ids. The error of a failing unit carries `units_sent`.
    fn send_ordered(&self, completions: &Completions, units: Vec<UnitColumns>, depth: usize) -> PyResult<u64> {
        let engine = self.engine.clone();
        let units: Vec<SendUnit> = units.into_iter().map(unit).collect();
        completions.spawn(async move {
            match engine.send_ordered(units, depth).await {
                Ok(sent) => Ready::SentUnits(sent),
                Err(f) => Ready::SendFailed(f),
            }
        })
    }

    /// Creates a PGMQ queue if missing; resolves to whether it was created.
    fn ensure_queue(&self, completions: &Completions, queue: String) -> PyResult<u64> {
        let engine = self.engine.clone();
        completions.spawn(async move {
            match engine.ensure_queue(&queue).await {
                Ok(created) => Ready::Bool(created),
                Err(e) => Ready::Failed(e, None),
            }
        })
    }

    fn close(&self, completions: &Completions) -> PyResult<u64> {
        let engine = self.engine.clone();
        completions.spawn(async move {
            engine.close().await;
            Ready::Unit
        })
    }
}
