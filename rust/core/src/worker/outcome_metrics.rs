//! Outcome metrics counted in the engine: per command type, the outcomes reported by kind, the
//! time from a command's hand-off to the handlers until its outcome is reported, and the time
//! from its send to the hand-off of its first attempt. Off until `enable`d (metrics are an
//! optional extra): then each claimed batch and each report costs one short lock here, and
//! Python reads the deltas about once a second (`take`), so a worker with metrics on runs the
//! same Python per command as one without.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{CoreError, CoreResult};
use crate::outcome::Outcome;

/// Outcome kinds, in the order of `TypeOutcomes::kinds`.
pub const OUTCOME_KINDS: [&str; 5] = ["SUCCESS", "BUSINESS_RULE", "RETRY", "EXHAUSTED", "PERMANENT"];

/// Held leases claimed while metrics were off carry this instead of a command-type index.
pub(crate) const NO_TYPE: u32 = u32::MAX;

/// The index of an outcome's kind in `OUTCOME_KINDS`.
pub fn kind_index(outcome: &Outcome) -> usize {
    match outcome {
        Outcome::Success { .. } => 0,
        Outcome::BusinessRule(_) => 1,
        Outcome::Retry { .. } => 2,
        Outcome::Exhausted(_) => 3,
        Outcome::Permanent(_) => 4,
    }
}

/// Observations per bucket (not cumulative: bucket `i` counts values `<= bounds[i]` and above
/// the bound before it, as prometheus-client keeps them) and their sum, in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub buckets: Vec<u64>,
    pub sum: f64,
}

impl Histogram {
    fn new(len: usize) -> Self {
        Histogram {
            buckets: vec![0; len],
            sum: 0.0,
        }
    }

    fn observe(&mut self, bounds: &[f64], value: f64) {
        let i = bounds.partition_point(|b| *b < value).min(self.buckets.len() - 1);
        self.buckets[i] += 1;
        self.sum += value;
    }

    fn take(&mut self) -> Histogram {
        let len = self.buckets.len();
        std::mem::replace(self, Histogram::new(len))
    }

    fn is_empty(&self) -> bool {
        self.buckets.iter().all(|&n| n == 0)
    }
}

/// What one command type did since the last `take`.
#[derive(Debug, Clone, PartialEq)]
pub struct TypeOutcomes {
    pub command_type: String,
    /// Outcomes reported, by kind (`OUTCOME_KINDS` order).
    pub kinds: [u64; 5],
    /// From the hand-off of the command to the handlers until its outcome was reported.
    pub duration: Histogram,
    /// From the send until the hand-off, first attempts only.
    pub wait: Histogram,
}

impl TypeOutcomes {
    fn is_empty(&self) -> bool {
        self.kinds.iter().all(|&n| n == 0) && self.duration.is_empty() && self.wait.is_empty()
    }
}

pub(crate) struct OutcomeMetrics {
    duration_bounds: Vec<f64>,
    wait_bounds: Vec<f64>,
    index: HashMap<String, u32>,
    types: Vec<TypeOutcomes>,
}

/// Upper bounds as given, ascending, with +Inf appended when missing (the last bucket holds
/// everything above the largest finite bound).
fn bounds(field: &'static str, given: Vec<f64>) -> CoreResult<Vec<f64>> {
    let invalid = |reason: String| CoreError::Invalid { field, reason };
    if given.iter().any(|b| b.is_nan()) {
        return Err(invalid(format!("{given:?} (NaN is not a bucket bound)")));
    }
    if given.windows(2).any(|w| w[0] >= w[1]) {
        return Err(invalid(format!("{given:?} (bounds must be strictly ascending)")));
    }
    let mut out = given;
    if out.last() != Some(&f64::INFINITY) {
        out.push(f64::INFINITY);
    }
    Ok(out)
}

impl OutcomeMetrics {
    pub(crate) fn new(duration_bounds: Vec<f64>, wait_bounds: Vec<f64>) -> CoreResult<Self> {
        Ok(OutcomeMetrics {
            duration_bounds: bounds("duration_bounds", duration_bounds)?,
            wait_bounds: bounds("wait_bounds", wait_bounds)?,
            index: HashMap::new(),
            types: Vec::new(),
        })
    }

    /// The index of a command type (a new type gets the next one).
    pub(crate) fn type_index(&mut self, command_type: &str) -> u32 {
        if let Some(&i) = self.index.get(command_type) {
            return i;
        }
        let i = self.types.len() as u32;
        self.types.push(TypeOutcomes {
            command_type: command_type.to_owned(),
            kinds: [0; 5],
            duration: Histogram::new(self.duration_bounds.len()),
            wait: Histogram::new(self.wait_bounds.len()),
        });
        self.index.insert(command_type.to_owned(), i);
        i
    }

    /// A first attempt handed to the handlers now, sent at `created_at_us` (microseconds since
    /// the epoch, the database's clock: a skew below zero counts as zero).
    pub(crate) fn observe_wait(&mut self, type_index: u32, created_at_us: i64, now: SystemTime) {
        let now_us = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64);
        let waited = (now_us.saturating_sub(created_at_us)).max(0) as f64 / 1e6;
        if let Some(t) = self.types.get_mut(type_index as usize) {
            t.wait.observe(&self.wait_bounds, waited);
        }
    }

    pub(crate) fn observe_outcome(&mut self, type_index: u32, kind: usize, took: Duration) {
        if let Some(t) = self.types.get_mut(type_index as usize) {
            t.kinds[kind] += 1;
            t.duration.observe(&self.duration_bounds, took.as_secs_f64());
        }
    }

    /// What changed since the last call, per command type (types with nothing new left out).
    pub(crate) fn take(&mut self) -> Vec<TypeOutcomes> {
        let mut out = Vec::new();
        for t in &mut self.types {
            if t.is_empty() {
                continue;
            }
            out.push(TypeOutcomes {
                command_type: t.command_type.clone(),
                kinds: std::mem::take(&mut t.kinds),
                duration: t.duration.take(),
                wait: t.wait.take(),
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::Failure;

    #[test]
    fn a_value_on_a_bound_falls_in_that_bucket() {
        // `le` semantics, as prometheus-client's own observe: 0.005 goes to the 0.005 bucket.
        let mut m = OutcomeMetrics::new(vec![0.005, 0.01, 1.0], vec![1.0]).unwrap();
        let t = m.type_index("a");
        for secs in [0.0, 0.005, 0.0051, 0.01, 0.5, 1.0, 7.0] {
            m.observe_outcome(t, 0, Duration::from_secs_f64(secs));
        }
        let taken = m.take();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].duration.buckets, vec![2, 2, 2, 1]);
        assert!((taken[0].duration.sum - 8.5201).abs() < 1e-9);
        assert_eq!(taken[0].kinds, [7, 0, 0, 0, 0]);
    }

    #[test]
    fn take_returns_deltas_per_type() {
        let mut m = OutcomeMetrics::new(vec![1.0], vec![1.0, f64::INFINITY]).unwrap();
        let (a, b) = (m.type_index("a"), m.type_index("b"));
        assert_eq!(m.type_index("a"), a);
        let failure = Failure {
            code: "X".into(),
            message: "m".into(),
            details: None,
            error_type: "TRANSIENT".into(),
        };
        m.observe_outcome(
            a,
            kind_index(&Outcome::Retry {
                failure: failure.clone(),
                backoff: 1,
            }),
            Duration::ZERO,
        );
        m.observe_outcome(b, kind_index(&Outcome::BusinessRule(failure)), Duration::from_secs(2));
        let sent = SystemTime::now() - Duration::from_millis(1500);
        let created = sent.duration_since(UNIX_EPOCH).unwrap().as_micros() as i64;
        m.observe_wait(b, created, SystemTime::now());
        let taken = m.take();
        assert_eq!(taken.len(), 2);
        assert_eq!((taken[0].command_type.as_str(), taken[0].kinds), ("a", [0, 0, 1, 0, 0]));
        assert_eq!((taken[1].command_type.as_str(), taken[1].kinds), ("b", [0, 1, 0, 0, 0]));
        assert_eq!(taken[1].duration.buckets, vec![0, 1]);
        assert_eq!(taken[1].wait.buckets, vec![0, 1]);
        assert!(m.take().is_empty(), "nothing new: nothing taken");
    }

    #[test]
    fn a_clock_behind_the_database_counts_as_no_wait() {
        let mut m = OutcomeMetrics::new(vec![1.0], vec![0.5]).unwrap();
        let t = m.type_index("a");
        let future = SystemTime::now() + Duration::from_secs(60);
        let created = future.duration_since(UNIX_EPOCH).unwrap().as_micros() as i64;
        m.observe_wait(t, created, SystemTime::now());
        let taken = m.take();
        assert_eq!((taken[0].wait.buckets.clone(), taken[0].wait.sum), (vec![1, 0], 0.0));
    }

    #[test]
    fn bad_bounds_are_refused() {
        assert!(OutcomeMetrics::new(vec![1.0, 0.5], vec![]).is_err());
        assert!(OutcomeMetrics::new(vec![1.0], vec![f64::NAN]).is_err());
        assert!(OutcomeMetrics::new(vec![], vec![]).is_ok(), "only +Inf: one bucket");
    }
}
