//! CoreError -> our Python exceptions (`commandbus.exceptions`), with the PostgreSQL error kept
//! as the cause (`PostgresError(message, sqlstate, detail)`).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use rcmd_core::CoreError;

pyo3::import_exception!(commandbus.exceptions, DatabaseError);
pyo3::import_exception!(commandbus.exceptions, PostgresError);
pyo3::import_exception!(commandbus.exceptions, DuplicateCommandError);
pyo3::import_exception!(commandbus.exceptions, DuplicateBatchError);
pyo3::import_exception!(commandbus.exceptions, CommandNotFoundError);
pyo3::import_exception!(commandbus.exceptions, BatchNotFoundError);
pyo3::import_exception!(commandbus.exceptions, InvalidNameError);
pyo3::import_exception!(commandbus.exceptions, InvalidOperationError);
pyo3::import_exception!(commandbus.exceptions, ValidationError);
pyo3::import_exception!(commandbus.exceptions, SchemaNotInstalledError);
pyo3::import_exception!(commandbus.exceptions, WorkerStoppedError);

/// Errors meaning "the commandbus schema or PGMQ is not there" (as python/commandbus/_errors.py).
fn schema_missing(sqlstate: &str, message: &str) -> bool {
    matches!(sqlstate, "3F000" | "42883")
        || (sqlstate == "42P01" && (message.contains("commandbus.") || message.contains("pgmq.meta")))
}

/// Maps a core error; `domain` names the domain of the call for the typed errors that carry it.
pub fn to_pyerr(err: CoreError, domain: Option<&str>) -> PyErr {
    let domain = domain.unwrap_or("").to_owned();
    match err {
        CoreError::Database {
            sqlstate,
            message,
            detail,
        } => Python::attach(|py| {
            let detail_s = detail.clone().unwrap_or_default();
            let main = match sqlstate.as_str() {
                "CB001" => DuplicateCommandError::new_err((domain, detail_s)),
                "CB002" => BatchNotFoundError::new_err((domain, detail_s)),
                "CB003" if message.starts_with("invalid queue name") => {
                    InvalidNameError::new_err(("queue", detail_s, message.clone()))
                }
                "CB003" => ValidationError::new_err(("input", detail_s, message.clone())),
                "CB004" | "CB006" | "CB008" => InvalidOperationError::new_err((message.clone(),)),
                "CB005" => CommandNotFoundError::new_err((domain, detail_s)),
                "CB007" => DuplicateBatchError::new_err((domain, detail_s)),
                s if schema_missing(s, &message) => SchemaNotInstalledError::new_err((
                    format!("commandbus schema or PGMQ missing ({message})"),
                    sqlstate.clone(),
                    detail.clone(),
                )),
                _ => DatabaseError::new_err((message.clone(), sqlstate.clone(), detail.clone())),
            };
            let cause = PostgresError::new_err((message, sqlstate, detail));
            main.set_cause(py, Some(cause));
            main
        }),
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
