//! `commandbus._native`: the thin PyO3 layer over rcmd-core. Registration on one screen.

use pyo3::prelude::*;

mod bridge;
mod bus;
mod errors;
mod outcome;
mod runtime;
mod worker;

/// Numbered schema migrations as (version, name, sql), from `sql/migrations/`.
#[pyfunction]
fn migrations() -> Vec<(i32, &'static str, &'static str)> {
    rcmd_core::sql::MIGRATIONS.to_vec()
}

/// Every named protocol statement, from `sql/statements/`.
#[pyfunction]
fn statements() -> Vec<(&'static str, &'static str)> {
    rcmd_core::sql::STATEMENTS.to_vec()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(migrations, m)?)?;
    m.add_function(wrap_pyfunction!(statements, m)?)?;
    m.add_class::<bridge::Completions>()?;
    m.add_class::<bus::NativeBus>()?;
    m.add_class::<outcome::Outcome>()?;
    m.add_class::<worker::NativeWorker>()?;
    Ok(())
}
