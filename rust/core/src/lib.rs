//! rcmd core: the engine of the command bus, with no PyO3 in it (this crate boundary is the GIL
//! boundary). Everything here talks to PostgreSQL + PGMQ through the versioned SQL functions in
//! `sql/`, one call per batch.

pub mod engine;
pub mod error;
pub mod events;
pub mod outcome;
pub mod sql;
pub mod worker;

pub use engine::{Claimed, Engine, EngineConfig, SendBatch, SendFailure, SendUnit};
pub use error::{CoreError, CoreResult};
pub use events::{EventKind, WorkerEvent};
pub use outcome::{Failure, Lease, Outcome, Report};
pub use worker::{Histogram, TypeOutcomes, WorkerConfig, WorkerCore, WorkerStats, OUTCOME_KINDS};
