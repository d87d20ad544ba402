//! Handler outcomes and their column form for `finish_commands_v1`.

use uuid::Uuid;

use crate::error::{CoreError, CoreResult};

/// The fencing token of a claimed command: an outcome applies only under the lease that claimed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lease {
    pub command_id: Uuid,
    pub msg_id: i64,
    pub attempt: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeKind {
    Success,
    Transient,
    Permanent,
    BusinessRule,
}

impl OutcomeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeKind::Success => "SUCCESS",
            OutcomeKind::Transient => "TRANSIENT",
            OutcomeKind::Permanent => "PERMANENT",
            OutcomeKind::BusinessRule => "BUSINESS_RULE",
        }
    }

    pub fn parse(text: &str) -> CoreResult<Self> {
        match text {
            "SUCCESS" => Ok(OutcomeKind::Success),
            "TRANSIENT" => Ok(OutcomeKind::Transient),
            "PERMANENT" => Ok(OutcomeKind::Permanent),
            "BUSINESS_RULE" => Ok(OutcomeKind::BusinessRule),
            other => Err(CoreError::Invalid {
                field: "outcome",
                reason: format!("{other:?} is not one of SUCCESS, TRANSIENT, PERMANENT, BUSINESS_RULE"),
            }),
        }
    }
}

/// One handler outcome, as reported by the Python side.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub lease: Lease,
    pub kind: OutcomeKind,
    /// JSON text of the handler's result (SUCCESS only).
    pub result: Option<String>,
    pub error_type: Option<String>,
    pub error_code: Option<String>,
    pub error_msg: Option<String>,
    /// JSON text of the error details.
    pub error_details: Option<String>,
    /// Seconds until a transient failure is retried.
    pub backoff: i32,
}

/// The arrays `finish_commands_v1` takes: one column per field, one row per outcome.
#[derive(Debug, Default, PartialEq)]
pub struct FinishColumns {
    pub command_ids: Vec<Uuid>,
    pub msg_ids: Vec<i64>,
    pub attempts: Vec<i32>,
    pub outcomes: Vec<&'static str>,
    pub results: Vec<Option<String>>,
    pub error_types: Vec<Option<String>>,
    pub error_codes: Vec<Option<String>>,
    pub error_msgs: Vec<Option<String>>,
    pub error_details: Vec<Option<String>>,
    pub backoffs: Vec<i32>,
}

impl FinishColumns {
    /// Builds the columns. A lease reported twice in one flush keeps only its first outcome:
    /// the fence would reject the second anyway, and one row per lease keeps the UPDATE simple.
    pub fn from_outcomes(outcomes: Vec<Outcome>) -> Self {
        let mut cols = FinishColumns::default();
        let mut seen = std::collections::HashSet::with_capacity(outcomes.len());
        for o in outcomes {
            if !seen.insert(o.lease) {
                continue;
            }
            cols.command_ids.push(o.lease.command_id);
            cols.msg_ids.push(o.lease.msg_id);
            cols.attempts.push(o.lease.attempt);
            cols.outcomes.push(o.kind.as_str());
            cols.results.push(o.result);
            cols.error_types.push(o.error_type);
            cols.error_codes.push(o.error_code);
            cols.error_msgs.push(o.error_msg);
            cols.error_details.push(o.error_details);
            cols.backoffs.push(o.backoff.max(0));
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
        self.outcomes.iter().all(|&o| o == OutcomeKind::Success.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(msg_id: i64, attempt: i32, kind: OutcomeKind) -> Outcome {
        Outcome {
            lease: Lease {
                command_id: Uuid::from_u128(msg_id as u128),
                msg_id,
                attempt,
            },
            kind,
            result: None,
            error_type: None,
            error_code: None,
            error_msg: None,
            error_details: None,
            backoff: -5,
        }
    }

    #[test]
    fn kinds_round_trip() {
        for k in [
            OutcomeKind::Success,
            OutcomeKind::Transient,
            OutcomeKind::Permanent,
            OutcomeKind::BusinessRule,
        ] {
            assert_eq!(OutcomeKind::parse(k.as_str()).unwrap(), k);
        }
        assert!(OutcomeKind::parse("DONE").is_err());
    }

    #[test]
    fn columns_keep_order_and_drop_repeated_leases() {
        let cols = FinishColumns::from_outcomes(vec![
            outcome(1, 1, OutcomeKind::Success),
            outcome(2, 1, OutcomeKind::Transient),
            outcome(1, 1, OutcomeKind::Permanent),
            outcome(1, 2, OutcomeKind::Permanent),
        ]);
        assert_eq!(cols.len(), 3);
        assert_eq!(cols.msg_ids, vec![1, 2, 1]);
        assert_eq!(cols.attempts, vec![1, 1, 2]);
        assert_eq!(cols.outcomes, vec!["SUCCESS", "TRANSIENT", "PERMANENT"]);
        assert_eq!(cols.backoffs, vec![0, 0, 0], "negative backoff is clamped");
        assert!(!cols.all_success());
    }

    #[test]
    fn all_success_only_when_every_outcome_is() {
        let ok = FinishColumns::from_outcomes(vec![
            outcome(1, 1, OutcomeKind::Success),
            outcome(2, 1, OutcomeKind::Success),
        ]);
        assert!(ok.all_success());
        for kind in [
            OutcomeKind::Transient,
            OutcomeKind::Permanent,
            OutcomeKind::BusinessRule,
        ] {
            let mixed = FinishColumns::from_outcomes(vec![outcome(1, 1, OutcomeKind::Success), outcome(2, 1, kind)]);
            assert!(!mixed.all_success(), "{kind:?}");
        }
    }
}
