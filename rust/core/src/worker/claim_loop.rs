//! The claim loop of `WorkerCore`: slot accounting, up to two claims in flight, backpressure,
//! NOTIFY wake-up with polling fallback, and claim retries with a capped backoff. What it
//! claims waits in a queue for `next_batch`, its leases already held.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{lock, WorkerCore};
use crate::engine::Claimed;
use crate::error::{CoreError, CoreResult};

/// Claims sent at once. With one, the loop sat idle for a whole claim round trip per batch;
/// with two, the next batch is being claimed while the current one runs.
const MAX_CLAIMS_IN_FLIGHT: usize = 2;
/// Claim retries back off from 0.2 s, doubling, up to this.
const MAX_CLAIM_BACKOFF: Duration = Duration::from_secs(5);

impl WorkerCore {
    /// The size of the claim due now, given `held` leases, or None: a claim is due when half the
    /// slots are free, or some are and nothing is held (one round trip per many handlers, and
    /// no idle worker). Slots reserved by claims in flight count as used.
    pub(super) fn claim_size(&self, held: usize) -> Option<usize> {
        let concurrency = self.cfg.concurrency.max(1);
        let chunk = (concurrency / 2).max(1);
        let free = concurrency.saturating_sub(held + self.reserved.load(Ordering::Acquire));
        (free >= chunk || (free > 0 && held == 0)).then(|| free.min(chunk))
    }

    /// The claim loop: keeps up to two claims of half the slots in flight while slots are free,
    /// hands what they claim to `next_batch`, and backs off after a failed claim (the failure
    /// goes to `next_batch` as well: the caller decides whether it ends the run).
    async fn claim_loop(self: Arc<Self>) {
        let mut claims: JoinSet<CoreResult<Vec<Claimed>>> = JoinSet::new();
        let mut sizes: HashMap<tokio::task::Id, usize> = HashMap::new();
        let mut stop_rx = self.stop_tx.subscribe();
        let mut failures: u32 = 0;
        let mut paused_until: Option<Instant> = None;
        loop {
            if *stop_rx.borrow_and_update() {
                break;
            }
            let slot_freed = self.slot_freed.notified();
            if paused_until.is_none() {
                while claims.len() < MAX_CLAIMS_IN_FLIGHT {
                    let held = lock(&self.in_flight).len();
                    let Some(size) = self.claim_size(held) else { break };
                    self.reserved.fetch_add(size, Ordering::AcqRel);
                    let core = Arc::clone(&self);
                    let handle = claims.spawn(async move { core.claim_when_due(size).await });
                    sizes.insert(handle.id(), size);
                }
            }
            tokio::select! {
                Some(joined) = claims.join_next_with_id(), if !claims.is_empty() => {
                    let (id, result) = match joined {
                        Ok((id, result)) => (id, result),
                        // A claim task panicked: a bug of ours, reported like a failed claim.
                        Err(e) => (e.id(), Err(CoreError::Protocol(format!("claim task failed: {e}")))),
                    };
                    if let Some(size) = sizes.remove(&id) {
                        self.reserved.fetch_sub(size, Ordering::AcqRel);
                    }
                    match result {
                        Ok(batch) => {
                            failures = 0;
                            if !batch.is_empty() {
                                self.deliver(Ok(batch));
                            }
                        }
                        Err(CoreError::Closed(_)) => {}
                        Err(err) => {
                            failures = failures.saturating_add(1);
                            let delay = Duration::from_millis(100)
                                .saturating_mul(1u32 << failures.min(16))
                                .min(MAX_CLAIM_BACKOFF);
                            paused_until = Some(Instant::now() + delay);
                            self.note_error(&err);
                            self.deliver(Err(err));
                        }
                    }
                }
                _ = tokio::time::sleep_until(paused_until.unwrap_or_else(Instant::now)), if paused_until.is_some() => {
                    paused_until = None;
                }
                _ = slot_freed => {}
                _ = stop_rx.changed() => {}
            }
        }
        // The claims answer at once now, or finish the statement they are in: what they claimed
        // is registered, and released by `shutdown` (never started).
        while claims.join_next().await.is_some() {}
        self.reserved.store(0, Ordering::Release);
    }

    /// One claim of the loop: waits while the flusher is behind, then claims up to `max`; when
    /// nothing is there, waits for NOTIFY (or `poll_interval`) and claims again. Empty once
    /// the worker is stopping.
    async fn claim_when_due(&self, max: usize) -> CoreResult<Vec<Claimed>> {
        let mut stop_rx = self.stop_tx.subscribe();
        loop {
            if *stop_rx.borrow_and_update() {
                return Ok(Vec::new());
            }
            // Backpressure: no new leases while the flusher is behind.
            let flushed = self.flushed.notified();
            if self.unflushed.load(Ordering::Acquire) > self.cfg.max_unflushed {
                tokio::select! {
                    _ = flushed => {}
                    // A flush ends with notify_waiters; re-check now and then regardless.
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stop_rx.changed() => {}
                }
                continue;
            }
            let claimed = self.claim_now(max, self.cfg.visibility_timeout).await?;
            if !claimed.is_empty() {
                return Ok(claimed);
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.cfg.poll_interval) => {}
                _ = stop_rx.changed() => {}
            }
        }
    }

    /// Spawns the claim loop unless it runs or the worker is stopping (checked under the lock
    /// `shutdown` takes the loop's handle with, after it set the stop flag: no loop starts
    /// behind its back).
    fn ensure_claim_loop(self: &Arc<Self>) {
        let mut handle = lock(&self.claim_loop);
        if handle.is_none() && !self.stopping() {
            *handle = Some(tokio::spawn(Self::claim_loop(Arc::clone(self))));
        }
    }

    fn deliver(&self, item: CoreResult<Vec<Claimed>>) {
        lock(&self.ready).push_back(item);
        self.batch_ready.notify_one();
    }

    /// The next claimed batch, once the loop has one; an error when a claim failed (the loop
    /// retries after a backoff); empty once the worker is stopping. The batch's leases are held
    /// before it is handed out, so a caller that goes away loses nothing: shutdown releases
    /// whatever was never reported.
    pub async fn next_batch(self: &Arc<Self>) -> CoreResult<Vec<Claimed>> {
        if !self.started.load(Ordering::Acquire) {
            return Err(CoreError::Invalid {
                field: "worker",
                reason: "next_batch before start".to_owned(),
            });
        }
        self.ensure_claim_loop();
        let mut stop_rx = self.stop_tx.subscribe();
        loop {
            if *stop_rx.borrow_and_update() {
                return Ok(Vec::new());
            }
            let ready = self.batch_ready.notified();
            let item = lock(&self.ready).pop_front();
            if let Some(item) = item {
                if let Ok(batch) = &item {
                    self.handing_out(batch);
                }
                return item;
            }
            tokio::select! {
                _ = ready => {}
                _ = stop_rx.changed() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::core;
    use super::*;

    #[test]
    fn claims_half_the_slots_or_any_when_idle() {
        let c = core(8);
        assert_eq!(c.claim_size(0), Some(4));
        assert_eq!(c.claim_size(4), Some(4));
        assert_eq!(c.claim_size(5), None, "3 free of 8: wait for half");
        c.reserved.store(4, Ordering::Release);
        assert_eq!(c.claim_size(0), Some(4));
        assert_eq!(c.claim_size(1), None);
        c.reserved.store(7, Ordering::Release);
        assert_eq!(c.claim_size(0), Some(1), "nothing held: claim what is free");
        c.reserved.store(8, Ordering::Release);
        assert_eq!(c.claim_size(0), None);
        let one = core(1);
        assert_eq!(one.claim_size(0), Some(1));
        assert_eq!(one.claim_size(1), None);
    }
}
