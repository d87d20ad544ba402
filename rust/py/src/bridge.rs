//! How results of Rust futures reach asyncio without a tokio thread ever taking the GIL.
//!
//! A `Completions` belongs to one event loop. A native call spawns its future on the runtime and
//! returns a token at once; when the future ends, the tokio thread stores the result (plain Rust
//! data) and writes one byte to a socket the event loop watches. The loop's reader callback then
//! calls `take()`, which converts every ready result to Python objects on the Python thread.
//! Tokio threads never hold Python objects, so nothing of ours can touch the interpreter while it
//! shuts down (with pyo3-async-runtimes a tokio thread could still be dropping Python objects when
//! the process exited, and it crashed).

use std::future::Future;
use std::io::{ErrorKind, Write};
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyList;
use pyo3::IntoPyObjectExt;
use rcmd_core::{Claimed, CoreError, SendFailure, WorkerEvent};
use uuid::Uuid;

use crate::errors::to_pyerr;
use crate::runtime::runtime;

/// (msg_id, attempt, max_attempts, command_id, command_type, data_json, correlation_id,
///  reply_to, batch_id, created_at_us)
type ClaimedTuple = (
    i64,
    i32,
    i32,
    Uuid,
    String,
    String,
    Option<Uuid>,
    Option<String>,
    Option<Uuid>,
    i64,
);

/// A finished native call, as plain Rust data until `take()` converts it.
pub enum Ready {
    Unit,
    Bool(bool),
    Int(i32),
    Claimed(Vec<Claimed>),
    /// (kind, message, count), or None: no more events.
    Event(Option<WorkerEvent>),
    Sent(Vec<i64>),
    SentUnits(Vec<Vec<i64>>),
    Failed(CoreError, Option<String>),
    /// `send_ordered` stopped at a unit: its error, with `units_sent` set on the exception.
    SendFailed(SendFailure),
}

impl Ready {
    fn into_py(self, py: Python<'_>) -> PyResult<(bool, Py<PyAny>)> {
        let value = match self {
            Ready::Unit => py.None(),
            Ready::Bool(b) => b.into_py_any(py)?,
            Ready::Int(i) => i.into_py_any(py)?,
            Ready::Claimed(batch) => {
                let rows: Vec<ClaimedTuple> = batch
                    .into_iter()
                    .map(|c| {
                        (
                            c.lease.msg_id,
                            c.lease.attempt,
                            c.max_attempts,
                            c.lease.command_id,
                            c.command_type,
                            c.data,
                            c.correlation_id,
                            c.reply_to,
                            c.batch_id,
                            c.lease.created_at_us,
                        )
                    })
                    .collect();
                rows.into_py_any(py)?
            }
            Ready::Event(event) => event.map(|e| (e.kind.as_str(), e.message, e.count)).into_py_any(py)?,
            Ready::Sent(msg_ids) => msg_ids.into_py_any(py)?,
            Ready::SentUnits(units) => units.into_py_any(py)?,
            Ready::SendFailed(SendFailure { index, domain, error }) => {
                let err = to_pyerr(error, Some(&domain)).into_value(py).into_any();
                err.bind(py).setattr("units_sent", index)?;
                return Ok((false, err));
            }
            Ready::Failed(err, domain) => {
                let err = to_pyerr(err, domain.as_deref());
                return Ok((false, err.into_value(py).into_any()));
            }
        };
        Ok((true, value))
    }
}

struct Inner {
    ready: Mutex<Vec<(u64, Ready)>>,
    wake: Mutex<UnixStream>,
}

impl Inner {
    fn complete(&self, token: u64, result: Ready) {
        self.ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((token, result));
        let mut wake = self.wake.lock().unwrap_or_else(|e| e.into_inner());
        match wake.write(b"x") {
            // A full socket already holds a wake-up: the reader drains every result anyway.
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            // The loop's end is gone (loop closed): nobody is waiting for the result.
            Err(_) => {}
        }
    }
}

static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);

#[pyclass(frozen, module = "commandbus._native")]
pub struct Completions {
    inner: Arc<Inner>,
    reader_fd: Mutex<Option<i32>>,
}

impl Completions {
    /// Spawns `fut` on the runtime; its result is delivered under the returned token.
    pub fn spawn<F>(&self, fut: F) -> PyResult<u64>
    where
        F: Future<Output = Ready> + Send + 'static,
    {
        let rt = runtime()?;
        let token = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
        let inner = Arc::clone(&self.inner);
        rt.spawn(async move {
            let result = fut.await;
            inner.complete(token, result);
        });
        Ok(token)
    }
}

#[pymethods]
impl Completions {
    #[new]
    fn new() -> PyResult<Self> {
        let (reader, writer) = UnixStream::pair().map_err(|e| PyRuntimeError::new_err(format!("socketpair: {e}")))?;
        writer
            .set_nonblocking(true)
            .map_err(|e| PyRuntimeError::new_err(format!("nonblocking: {e}")))?;
        Ok(Completions {
            inner: Arc::new(Inner {
                ready: Mutex::new(Vec::new()),
                wake: Mutex::new(writer),
            }),
            reader_fd: Mutex::new(Some(reader.into_raw_fd())),
        })
    }

    /// The file descriptor the event loop watches; ownership passes to the caller (once).
    fn take_reader_fd(&self) -> PyResult<i32> {
        self.reader_fd
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("the reader fd was already taken"))
    }

    /// Every finished call as (token, ok, value-or-exception), converted in one GIL hold.
    fn take<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let ready: Vec<(u64, Ready)> = std::mem::take(&mut *self.inner.ready.lock().unwrap_or_else(|e| e.into_inner()));
        let out = PyList::empty(py);
        for (token, result) in ready {
            let (ok, value) = result.into_py(py)?;
            out.append((token, ok, value))?;
        }
        Ok(out)
    }
}
