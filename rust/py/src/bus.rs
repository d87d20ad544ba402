//! NativeBus: the Rust send path of `CommandBus`.

use pyo3::prelude::*;
use rcmd_core::{Engine, EngineConfig, SendBatch};
use uuid::Uuid;

use crate::errors::to_pyerr;
use crate::runtime::runtime;

#[pyclass(frozen, module = "commandbus._native")]
pub struct NativeBus {
    engine: Engine,
}

#[pymethods]
impl NativeBus {
    #[new]
    #[pyo3(signature = (dsn, max_connections = 10))]
    fn new(dsn: String, max_connections: u32) -> PyResult<Self> {
        let rt = runtime()?;
        let _guard = rt.enter();
        let mut cfg = EngineConfig::new(dsn);
        cfg.max_connections = max_connections;
        cfg.application_name = "rcmd-bus".into();
        let engine = Engine::connect_lazy(&cfg).map_err(|e| to_pyerr(e, None))?;
        Ok(NativeBus { engine })
    }

    /// Sends the commands of one domain atomically. Returns [(command_id, msg_id, correlation_id)].
    #[allow(clippy::too_many_arguments)]
    fn send<'py>(
        &self,
        py: Python<'py>,
        domain: String,
        command_ids: Vec<Uuid>,
        command_types: Vec<String>,
        data: Vec<String>,
        correlation_ids: Vec<Option<Uuid>>,
        reply_tos: Vec<Option<String>>,
        max_attempts: Vec<Option<i32>>,
        batch_ids: Vec<Option<Uuid>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        runtime()?;
        let engine = self.engine.clone();
        let batch = SendBatch {
            command_ids,
            command_types,
            data,
            correlation_ids,
            reply_tos,
            max_attempts,
            batch_ids,
        };
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            engine
                .send(&domain, batch)
                .await
                .map_err(|e| to_pyerr(e, Some(&domain)))
        })
    }

    fn ensure_queue<'py>(&self, py: Python<'py>, queue: String) -> PyResult<Bound<'py, PyAny>> {
        runtime()?;
        let engine = self.engine.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            engine.ensure_queue(&queue).await.map_err(|e| to_pyerr(e, None))
        })
    }

    fn close<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        runtime()?;
        let engine = self.engine.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            engine.close().await;
            Ok(())
        })
    }
}
