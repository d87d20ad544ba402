//! The one tokio runtime of the process, built lazily on first use. A runtime does not survive `fork()`: a child that inherited one gets a
//! clear error instead of a hang.

use std::sync::OnceLock;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use tokio::runtime::Runtime;

static RUNTIME: OnceLock<(u32, Runtime)> = OnceLock::new();

pub fn runtime() -> PyResult<&'static Runtime> {
    let (pid, rt) = RUNTIME.get_or_init(|| {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .clamp(2, 4);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("rcmd-tokio")
            .enable_all()
            .build()
            .expect("cannot start the tokio runtime");
        (std::process::id(), rt)
    });
    if *pid != std::process::id() {
        return Err(PyRuntimeError::new_err(
            "commandbus's native runtime was created before fork(); create CommandBus and Worker objects in the child process",
        ));
    }
    Ok(rt)
}
