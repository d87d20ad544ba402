//! `Outcome`: a handler's outcome as a typed, immutable value. Python builds it with one of the
//! constructors (the worker's RetryPolicy has already chosen between retry and exhausted), so a
//! malformed outcome cannot reach the flush.

use pyo3::prelude::*;
use rcmd_core::{Failure, Outcome as CoreOutcome};

#[pyclass(frozen, name = "Outcome", module = "commandbus._native")]
pub struct Outcome {
    pub inner: CoreOutcome,
}

fn failure(error_type: &str, code: String, message: String, details: Option<String>) -> Failure {
    Failure {
        error_type: error_type.to_owned(),
        code,
        message,
        details,
    }
}

#[pymethods]
impl Outcome {
    /// COMPLETED, with the handler's result as JSON text (or None).
    #[staticmethod]
    #[pyo3(signature = (result=None))]
    fn success(result: Option<String>) -> Self {
        Outcome {
            inner: CoreOutcome::Success { result },
        }
    }

    /// A transient failure with attempts left: visible again after `backoff` seconds.
    #[staticmethod]
    #[pyo3(signature = (code, message, details, backoff))]
    fn retry(code: String, message: String, details: Option<String>, backoff: u32) -> Self {
        Outcome {
            inner: CoreOutcome::Retry {
                failure: failure("TRANSIENT", code, message, details),
                backoff: backoff.min(i32::MAX as u32) as i32,
            },
        }
    }

    /// A transient failure of the last allowed attempt: the TSQ, audited as RETRY_EXHAUSTED.
    #[staticmethod]
    #[pyo3(signature = (code, message, details))]
    fn exhausted(code: String, message: String, details: Option<String>) -> Self {
        Outcome {
            inner: CoreOutcome::Exhausted(failure("TRANSIENT", code, message, details)),
        }
    }

    /// The TSQ at once. `error_type` is the class of the error stored with it (a transient
    /// error failed as permanent keeps TRANSIENT).
    #[staticmethod]
    #[pyo3(signature = (code, message, details, error_type="PERMANENT"))]
    fn permanent(code: String, message: String, details: Option<String>, error_type: &str) -> Self {
        Outcome {
            inner: CoreOutcome::Permanent(failure(error_type, code, message, details)),
        }
    }

    /// FAILED, with a FAILED reply where the command asked for one.
    #[staticmethod]
    #[pyo3(signature = (code, message, details))]
    fn business_rule(code: String, message: String, details: Option<String>) -> Self {
        Outcome {
            inner: CoreOutcome::BusinessRule(failure("BUSINESS_RULE", code, message, details)),
        }
    }

    /// The outcome code: SUCCESS, RETRY, EXHAUSTED, PERMANENT or BUSINESS_RULE.
    #[getter]
    fn kind(&self) -> &'static str {
        self.inner.code()
    }

    /// Seconds until the retry (RETRY only, else None).
    #[getter]
    fn backoff(&self) -> Option<i32> {
        match &self.inner {
            CoreOutcome::Retry { backoff, .. } => Some(*backoff),
            _ => None,
        }
    }

    fn __repr__(&self) -> String {
        match &self.inner {
            CoreOutcome::Success { .. } => "Outcome.success(...)".to_owned(),
            CoreOutcome::Retry { failure, backoff } => {
                format!("Outcome.retry({:?}, backoff={backoff})", failure.code)
            }
            CoreOutcome::Exhausted(f) => format!("Outcome.exhausted({:?})", f.code),
            CoreOutcome::Permanent(f) => format!("Outcome.permanent({:?})", f.code),
            CoreOutcome::BusinessRule(f) => format!("Outcome.business_rule({:?})", f.code),
        }
    }
}
