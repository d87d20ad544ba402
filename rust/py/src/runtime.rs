//! The one tokio runtime of the process, built lazily on first use. A runtime does not survive
//! `fork()`: a child that inherited one gets a clear error instead of a hang.
//!
//! One worker thread by default: the engine only moves bytes between PostgreSQL and Python (a few
//! microseconds of CPU per command), and every extra thread competes with the Python thread and
//! PostgreSQL for the cores. `RCMD_TOKIO_THREADS` (1-64) changes it.

use std::sync::OnceLock;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use tokio::runtime::Runtime;

use crate::errors::ValidationError;

static RUNTIME: OnceLock<(u32, Runtime)> = OnceLock::new();

/// Worker threads of the runtime: `RCMD_TOKIO_THREADS` when set, else 1.
fn worker_threads() -> PyResult<usize> {
    match std::env::var("RCMD_TOKIO_THREADS") {
        Err(_) => Ok(1),
        Ok(text) => match text.trim().parse::<usize>() {
            Ok(n) if (1..=64).contains(&n) => Ok(n),
            _ => Err(ValidationError::new_err((
                "RCMD_TOKIO_THREADS",
                text,
                "must be a whole number from 1 to 64",
            ))),
        },
    }
}

pub fn runtime() -> PyResult<&'static Runtime> {
    if RUNTIME.get().is_none() {
        let threads = worker_threads()?;
        let _ = RUNTIME.get_or_init(|| {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name("rcmd-tokio")
                .enable_all()
                .build()
                .expect("cannot start the tokio runtime");
            (std::process::id(), rt)
        });
    }
    let (pid, rt) = RUNTIME.get().expect("initialised above");
    if *pid != std::process::id() {
        return Err(PyRuntimeError::new_err(
            "commandbus's native runtime was created before fork(); create CommandBus and Worker objects in the child process",
        ));
    }
    Ok(rt)
}
