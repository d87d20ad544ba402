//! CoreError -> our Python exceptions (`commandbus.exceptions`). Which exception a PostgreSQL
//! error becomes is decided once, in Python (`commandbus._errors.database_error`, also used for
//! psycopg errors); the PostgreSQL error is kept as the cause
//! (`PostgresError(message, sqlstate, detail)`).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use rcmd_core::CoreError;

pyo3::import_exception!(commandbus.exceptions, DatabaseError);
pyo3::import_exception!(commandbus.exceptions, PostgresError);
pyo3::import_exception!(commandbus.exceptions, ValidationError);
pyo3::import_exception!(commandbus.exceptions, WorkerStoppedError);

static DATABASE_ERROR: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// The exception `commandbus._errors.database_error` builds for a PostgreSQL error, with the
/// PostgreSQL error as its cause.
fn database_error(
    py: Python<'_>,
    sqlstate: String,
    message: String,
    detail: Option<String>,
    domain: Option<&str>,
) -> PyResult<PyErr> {
    let build = DATABASE_ERROR.get_or_try_init(py, || {
        Ok::<_, PyErr>(py.import("commandbus._errors")?.getattr("database_error")?.unbind())
    })?;
    let main = build
        .bind(py)
        .call1((sqlstate.as_str(), message.as_str(), detail.as_deref(), domain))?;
    let main = PyErr::from_value(main);
    main.set_cause(py, Some(PostgresError::new_err((message, sqlstate, detail))));
    Ok(main)
}

/// Maps a core error; `domain` names the domain of the call for the typed errors that carry it.
pub fn to_pyerr(err: CoreError, domain: Option<&str>) -> PyErr {
    match err {
        CoreError::Database {
            sqlstate,
            message,
            detail,
        } => Python::attach(|py| database_error(py, sqlstate, message, detail, domain).unwrap_or_else(|e| e)),
        CoreError::Connection(msg) => DatabaseError::new_err((msg, Option::<String>::None, Option::<String>::None)),
        CoreError::Protocol(msg) => DatabaseError::new_err((
            format!("protocol error: {msg}"),
            Option::<String>::None,
            Option::<String>::None,
        )),
        CoreError::Invalid { field, reason } => PyValueError::new_err(format!("invalid {field}: {reason}")),
        CoreError::Closed(what) => WorkerStoppedError::new_err(format!("{what} is closed")),
    }
}
