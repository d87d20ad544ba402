//! Handler outcomes and their column form for `finish_commands_v1`.
//!
//! The worker decides what a failure means (retry after a backoff, or exhausted) before it
//! reports it: SQL applies the outcome it is told, under the lease's fence.

use uuid::Uuid;

/// The fencing token of a claimed command: an outcome applies only under the lease that claimed it.
/// `created_at_us` (the command's created_at, microseconds since the epoch, as the claim returned
/// it) names the day partition of its row: the flush looks it up there only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lease {
    pub command_id: Uuid,
    pub msg_id: i64,
    pub attempt: i32,
    pub created_at_us: i64,
}

/// What went wrong, as stored in the command row and the audit details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// `TRANSIENT`, `PERMANENT` or `BUSINESS_RULE` (the command's `last_error_type`).
    pub error_type: String,
    pub code: String,
    pub message: String,
    /// JSON text of the error details.
    pub details: Option<String>,
}

/// One handler outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// COMPLETED; `result` is the JSON text of the handler's result.
    Success { result: Option<String> },
    /// A transient failure with attempts left: visible again after `backoff` seconds.
    Retry { failure: Failure, backoff: i32 },
    /// A transient failure of the last allowed attempt: the TSQ (`RETRY_EXHAUSTED`).
    Exhausted(Failure),
    /// The TSQ at once.
    Permanent(Failure),
    /// FAILED, with a FAILED reply.
    BusinessRule(Failure),
}

impl Outcome {
    /// The outcome code `finish_commands_v1` takes.
    pub fn code(&self) -> &'static str {
        match self {
            Outcome::Success { .. } => "SUCCESS",
            Outcome::Retry { .. } => "RETRY",
            Outcome::Exhausted(_) => "EXHAUSTED",
            Outcome::Permanent(_) => "PERMANENT",
            Outcome::BusinessRule(_) => "BUSINESS_RULE",
        }
    }
}

/// An outcome reported for a held lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub lease: Lease,
    pub outcome: Outcome,
}

/// The arrays `finish_commands_v1` takes: one column per field, one row per outcome.
#[derive(Debug, Default, PartialEq)]
pub struct FinishColumns {
    pub command_ids: Vec<Uuid>,
    pub msg_ids: Vec<i64>,
    pub attempts: Vec<i32>,
    pub created_at_us: Vec<i64>,
    pub outcomes: Vec<&'static str>,
    pub results: Vec<Option<String>>,
    pub error_types: Vec<Option<String>>,
    pub error_codes: Vec<Option<String>>,
    pub error_msgs: Vec<Option<String>>,
    pub error_details: Vec<Option<String>>,
    pub backoffs: Vec<i32>,
    all_success: bool,
}

impl FinishColumns {
    /// Builds the columns. A lease reported twice in one flush keeps only its first outcome:
    /// the fence would reject the second anyway, and one row per lease keeps the UPDATE simple.
    pub fn from_reports(reports: Vec<Report>) -> Self {
        let mut cols = FinishColumns {
            all_success: true,
            ..FinishColumns::default()
        };
        let mut seen = std::collections::HashSet::with_capacity(reports.len());
        for Report { lease, outcome } in reports {
            if !seen.insert(lease) {
                continue;
            }
            cols.command_ids.push(lease.command_id);
            cols.msg_ids.push(lease.msg_id);
            cols.attempts.push(lease.attempt);
            cols.created_at_us.push(lease.created_at_us);
            cols.outcomes.push(outcome.code());
            let (result, failure, backoff) = match outcome {
                Outcome::Success { result } => (result, None, 0),
                Outcome::Retry { failure, backoff } => (None, Some(failure), backoff.max(0)),
                Outcome::Exhausted(f) | Outcome::Permanent(f) | Outcome::BusinessRule(f) => (None, Some(f), 0),
            };
            cols.all_success &= failure.is_none();
            cols.results.push(result);
            match failure {
                Some(f) => {
                    cols.error_types.push(Some(f.error_type));
                    cols.error_codes.push(Some(f.code));
                    cols.error_msgs.push(Some(f.message));
                    cols.error_details.push(f.details);
                }
                None => {
                    cols.error_types.push(None);
                    cols.error_codes.push(None);
                    cols.error_msgs.push(None);
                    cols.error_details.push(None);
                }
            }
            cols.backoffs.push(backoff);
        }
        cols
    }

    pub fn len(&self) -> usize {
        self.command_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.command_ids.is_empty()
    }

    /// Every outcome is SUCCESS: the flush can take `complete_commands_v1`, which needs only
    /// the lease and result columns.
    pub fn all_success(&self) -> bool {
        self.all_success
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(error_type: &str) -> Failure {
        Failure {
            error_type: error_type.into(),
            code: "E1".into(),
            message: "boom".into(),
            details: Some("{\"k\": 1}".into()),
        }
    }

    fn report(msg_id: i64, attempt: i32, outcome: Outcome) -> Report {
        Report {
            lease: Lease {
                command_id: Uuid::from_u128(msg_id as u128),
                msg_id,
                attempt,
                created_at_us: 1_700_000_000_000_000 + msg_id,
            },
            outcome,
        }
    }

    fn success() -> Outcome {
        Outcome::Success { result: None }
    }

    #[test]
    fn codes_are_the_ones_sql_knows() {
        let codes: Vec<&str> = [
            success(),
            Outcome::Retry {
                failure: failure("TRANSIENT"),
                backoff: 1,
            },
            Outcome::Exhausted(failure("TRANSIENT")),
            Outcome::Permanent(failure("PERMANENT")),
            Outcome::BusinessRule(failure("BUSINESS_RULE")),
        ]
        .iter()
        .map(Outcome::code)
        .collect();
        assert_eq!(codes, ["SUCCESS", "RETRY", "EXHAUSTED", "PERMANENT", "BUSINESS_RULE"]);
    }

    #[test]
    fn columns_keep_order_and_drop_repeated_leases() {
        let cols = FinishColumns::from_reports(vec![
            report(
                1,
                1,
                Outcome::Success {
                    result: Some("{}".into()),
                },
            ),
            report(
                2,
                1,
                Outcome::Retry {
                    failure: failure("TRANSIENT"),
                    backoff: -5,
                },
            ),
            report(1, 1, Outcome::Permanent(failure("PERMANENT"))),
            report(1, 2, Outcome::Exhausted(failure("TRANSIENT"))),
        ]);
        assert_eq!(cols.len(), 3);
        assert_eq!(cols.msg_ids, vec![1, 2, 1]);
        assert_eq!(cols.attempts, vec![1, 1, 2]);
        assert_eq!(cols.outcomes, vec!["SUCCESS", "RETRY", "EXHAUSTED"]);
        assert_eq!(cols.results, vec![Some("{}".into()), None, None]);
        assert_eq!(
            cols.error_types,
            vec![None, Some("TRANSIENT".into()), Some("TRANSIENT".into())]
        );
        assert_eq!(cols.error_codes, vec![None, Some("E1".into()), Some("E1".into())]);
        assert_eq!(cols.error_details[0], None);
        assert_eq!(cols.backoffs, vec![0, 0, 0], "negative backoff is clamped");
        assert!(!cols.all_success());
    }

    #[test]
    fn all_success_only_when_every_outcome_is() {
        let ok = FinishColumns::from_reports(vec![report(1, 1, success()), report(2, 1, success())]);
        assert!(ok.all_success());
        for other in [
            Outcome::Retry {
                failure: failure("TRANSIENT"),
                backoff: 3,
            },
            Outcome::Exhausted(failure("TRANSIENT")),
            Outcome::Permanent(failure("PERMANENT")),
            Outcome::BusinessRule(failure("BUSINESS_RULE")),
        ] {
            let mixed = FinishColumns::from_reports(vec![report(1, 1, success()), report(2, 1, other.clone())]);
            assert!(!mixed.all_success(), "{other:?}");
        }
    }
}
