//! The one error type of the core. The binding crate maps it to `commandbus.exceptions`.

use thiserror::Error;

pub type CoreResult<T> = Result<T, CoreError>;

#[derive(Debug, Error)]
pub enum CoreError {
    /// PostgreSQL answered with an error; SQLSTATE and detail are kept for the Python cause.
    #[error("{message}")]
    Database {
        sqlstate: String,
        message: String,
        detail: Option<String>,
    },
    /// No answer from PostgreSQL (connect, I/O, pool timeout, TLS).
    #[error("database connection failed: {0}")]
    Connection(String),
    /// A row came back in a shape the protocol does not expect.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Bad configuration or input caught before any I/O.
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// The worker or bus was shut down.
    #[error("{0} is closed")]
    Closed(&'static str),
}

impl CoreError {
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            CoreError::Database { sqlstate, .. } => Some(sqlstate),
            _ => None,
        }
    }
}

impl From<sqlx::Error> for CoreError {
    fn from(err: sqlx::Error) -> Self {
        match err {
            sqlx::Error::Database(db) => {
                let detail = db
                    .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                    .and_then(|pg| pg.detail().map(str::to_owned));
                CoreError::Database {
                    sqlstate: db.code().map(|c| c.into_owned()).unwrap_or_default(),
                    message: db.message().to_owned(),
                    detail,
                }
            }
            sqlx::Error::ColumnNotFound(_)
            | sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::Decode(_)
            | sqlx::Error::TypeNotFound { .. }
            | sqlx::Error::RowNotFound => CoreError::Protocol(err.to_string()),
            sqlx::Error::PoolClosed => CoreError::Closed("connection pool"),
            sqlx::Error::Configuration(e) => CoreError::Invalid {
                field: "dsn",
                reason: e.to_string(),
            },
            other => CoreError::Connection(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstate_only_for_database_errors() {
        let db = CoreError::Database {
            sqlstate: "CB001".into(),
            message: "dup".into(),
            detail: None,
        };
        assert_eq!(db.sqlstate(), Some("CB001"));
        assert_eq!(CoreError::Closed("worker").sqlstate(), None);
        assert_eq!(CoreError::Closed("worker").to_string(), "worker is closed");
    }

    #[test]
    fn pool_closed_maps_to_closed() {
        assert!(matches!(CoreError::from(sqlx::Error::PoolClosed), CoreError::Closed(_)));
        assert!(matches!(
            CoreError::from(sqlx::Error::RowNotFound),
            CoreError::Protocol(_)
        ));
    }
}
