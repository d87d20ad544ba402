//! The engine: a sqlx pool and one method per protocol call. Every call is one statement over
//! arrays, so a batch costs one round trip: a versioned SQL function, or for plain sends the
//! prepared `send_commands_direct` (the function is its fallback).

use std::collections::VecDeque;
use std::str::FromStr;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Connection, Executor, Postgres, Row, Transaction};
use tokio::task::{JoinError, JoinHandle};
use uuid::Uuid;

use crate::error::{CoreError, CoreResult};
use crate::outcome::{FinishColumns, Lease, Report};
use crate::sql;

/// A pooled connection idle for this long is pinged before it is handed out again.
const PING_IDLE_AFTER: Duration = Duration::from_secs(1);
/// The default deadline of one database call (`EngineConfig::call_timeout`).
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Added to a call's deadline per row it carries (a flush of 1,000 outcomes gets 1 s more, up
/// to one more call timeout).
const DEADLINE_PER_ROW: Duration = Duration::from_millis(1);
/// The server cancels a statement of the engine after this many call deadlines
/// (`statement_timeout`), so a backend whose client gave up (a statement stuck behind a lock
/// when its connection was abandoned) does not hold a connection slot for long.
const SERVER_TIMEOUT_FACTOR: u32 = 3;

/// Runs `$fut` (a call on the pooled connection `$conn`) within `$deadline`. With no answer in
/// time the connection is abandoned: detached from the pool and closed (never handed out again,
/// its slot free for a fresh one), and the enclosing function returns a connection error.
macro_rules! timed {
    ($conn:ident, $deadline:expr, $fut:expr) => {{
        let deadline: Duration = $deadline;
        let result = tokio::time::timeout(deadline, $fut).await;
        match result {
            Ok(r) => r.map_err(CoreError::from),
            Err(_) => {
                drop($conn.detach());
                return Err(no_answer(deadline));
            }
        }
    }};
}

/// The error of a call that got no answer within `deadline`.
fn no_answer(deadline: Duration) -> CoreError {
    CoreError::Connection(format!(
        "no answer from the database within {:.1} s; connection abandoned",
        deadline.as_secs_f64()
    ))
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// `postgresql://` URL (a Unix socket directory goes in `?host=/path`).
    pub dsn: String,
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    pub application_name: String,
    /// The deadline of one database call (plus `DEADLINE_PER_ROW` per row it carries): a call
    /// with no answer by then abandons its connection and fails as a connection error.
    pub call_timeout: Duration,
}

impl EngineConfig {
    pub fn new(dsn: impl Into<String>) -> Self {
        EngineConfig {
            dsn: dsn.into(),
            max_connections: 10,
            acquire_timeout: DEFAULT_CALL_TIMEOUT,
            application_name: "rcmd".to_owned(),
            call_timeout: DEFAULT_CALL_TIMEOUT,
        }
    }
}

/// Commands of one domain to send in one call, as parallel columns.
#[derive(Debug, Default, Clone)]
pub struct SendBatch {
    pub command_ids: Vec<Uuid>,
    pub command_types: Vec<String>,
    /// JSON text of each command's queue message (built by the caller, see
    /// `send_commands_v2`).
    pub messages: Vec<String>,
    pub correlation_ids: Vec<Uuid>,
    pub reply_tos: Vec<Option<String>>,
    pub max_attempts: Vec<Option<i32>>,
    pub batch_ids: Vec<Option<Uuid>>,
}

impl SendBatch {
    pub fn len(&self) -> usize {
        self.command_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.command_ids.is_empty()
    }

    /// No command of the batch names a batch or a reply queue (`send_commands_direct` sends it).
    pub fn is_plain(&self) -> bool {
        self.batch_ids.iter().all(Option::is_none) && self.reply_tos.iter().all(Option::is_none)
    }

    /// All columns must have one entry per command.
    pub fn check(&self) -> CoreResult<()> {
        let n = self.len();
        let lens = [
            self.command_types.len(),
            self.messages.len(),
            self.correlation_ids.len(),
            self.reply_tos.len(),
            self.max_attempts.len(),
            self.batch_ids.len(),
        ];
        if lens.iter().any(|&l| l != n) {
            return Err(CoreError::Invalid {
                field: "send batch",
                reason: format!("column lengths differ: {n} ids, {lens:?}"),
            });
        }
        Ok(())
    }
}

/// One domain's commands of a `send_ordered` call.
pub type SendUnit = (String, SendBatch);

/// A unit whose statement ran in its own transaction, not yet committed (or why it failed).
struct Opened {
    unit: SendUnit,
    result: CoreResult<(Transaction<'static, Postgres>, Vec<i64>)>,
}

/// A unit `send_ordered` could not send: its index (every unit before it is sent, none after)
/// and domain, and the error.
#[derive(Debug)]
pub struct SendFailure {
    pub index: usize,
    pub domain: String,
    pub error: CoreError,
}

/// A command claimed under a lease, ready for its handler.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub lease: Lease,
    pub max_attempts: i32,
    pub command_type: String,
    /// JSON text of the command's `data`.
    pub data: String,
    pub correlation_id: Option<Uuid>,
    pub reply_to: Option<String>,
    pub batch_id: Option<Uuid>,
}

impl Claimed {
    fn from_row(row: &PgRow) -> CoreResult<Self> {
        Ok(Claimed {
            lease: Lease {
                command_id: row.try_get("command_id")?,
                msg_id: row.try_get("msg_id")?,
                attempt: row.try_get("attempt")?,
                created_at_us: row.try_get("created_at_us")?,
            },
            max_attempts: row.try_get("max_attempts")?,
            command_type: row.try_get("command_type")?,
            data: row.try_get("data")?,
            correlation_id: row.try_get("correlation_id")?,
            reply_to: row.try_get("reply_to")?,
            batch_id: row.try_get("batch_id")?,
        })
    }
}

#[derive(Clone)]
pub struct Engine {
    pool: PgPool,
    /// What the pool connects with (the listener's own connections use it too).
    opts: PgConnectOptions,
    call_timeout: Duration,
}

impl Engine {
    /// Builds the pool without connecting (connections open on first use). Must run inside a
    /// tokio runtime context.
    pub fn connect_lazy(cfg: &EngineConfig) -> CoreResult<Self> {
        let opts = PgConnectOptions::from_str(&cfg.dsn)
            .map_err(|e| CoreError::Invalid {
                field: "dsn",
                reason: e.to_string(),
            })?
            .application_name(&cfg.application_name);
        let call_timeout = cfg.call_timeout.max(Duration::from_millis(1));
        let server_ms = call_timeout
            .saturating_mul(SERVER_TIMEOUT_FACTOR)
            .as_millis()
            .to_string();
        // A statement_timeout the DSN sets itself (`options=-c statement_timeout=...`, as the
        // sync worker's) is kept.
        let own_timeout = opts.get_options().is_some_and(|o| o.contains("statement_timeout"));
        let pool = PgPoolOptions::new()
            .max_connections(cfg.max_connections.max(1))
            .acquire_timeout(cfg.acquire_timeout)
            // sqlx pings every connection it hands out by default: one more round trip per
            // call, a sixth of a single send. A connection busy within the last second is
            // taken as alive (a dead one then fails its statement, which the caller sees as
            // a connection error, as it would if the server went away mid-call).
            .test_before_acquire(false)
            .after_connect(move |conn, _meta| {
                let server_ms = server_ms.clone();
                Box::pin(async move {
                    if own_timeout {
                        return Ok(());
                    }
                    let set = sqlx::query(sql::SET_STATEMENT_TIMEOUT).bind(server_ms).execute(conn);
                    match tokio::time::timeout(call_timeout, set).await {
                        Ok(done) => done.map(|_| ()),
                        Err(_) => Err(sqlx::Error::PoolTimedOut),
                    }
                })
            })
            // The ping has the call deadline: a silent connection is closed (an error here
            // makes sqlx close it without a goodbye) and the acquire opens a fresh one.
            .before_acquire(move |conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_IDLE_AFTER {
                        match tokio::time::timeout(call_timeout, conn.ping()).await {
                            Ok(pinged) => pinged?,
                            Err(_) => return Err(sqlx::Error::PoolTimedOut),
                        }
                    }
                    Ok(true)
                })
            })
            .connect_lazy_with(opts.clone());
        Ok(Engine {
            pool,
            opts,
            call_timeout,
        })
    }

    /// The deadline of a call carrying `rows` rows: the call timeout plus `DEADLINE_PER_ROW`
    /// per row, at most twice the call timeout (the server's `statement_timeout` is three
    /// times it).
    pub fn deadline(&self, rows: usize) -> Duration {
        let per_rows = DEADLINE_PER_ROW.saturating_mul(rows.min(u32::MAX as usize) as u32);
        self.call_timeout.saturating_add(per_rows.min(self.call_timeout))
    }

    /// A pooled connection (waiting at most the pool's acquire timeout).
    async fn conn(&self) -> CoreResult<PoolConnection<Postgres>> {
        Ok(self.pool.acquire().await?)
    }

    /// Closes the pool: nothing more is handed out, idle connections are closed, and the wait
    /// for connections in use to come back lasts at most the call timeout (one stuck on a
    /// silent network, e.g. in sqlx's ping of a returned connection, is dropped when it gives
    /// up; before, `CommandBus.close()` waited for it without end).
    pub async fn close(&self) {
        let _ = tokio::time::timeout(self.call_timeout, self.pool.close()).await;
    }

    pub async fn ensure_queue(&self, queue: &str) -> CoreResult<bool> {
        let mut conn = self.conn().await?;
        let row = timed!(
            conn,
            self.deadline(0),
            sqlx::query(sql::ENSURE_QUEUE).bind(queue).fetch_one(&mut *conn)
        )?;
        Ok(row.try_get("created")?)
    }

    /// ANALYZEs the command table if it never was (see `refresh_statistics_v1`).
    pub async fn refresh_statistics(&self) -> CoreResult<bool> {
        let mut conn = self.conn().await?;
        let row = timed!(
            conn,
            self.deadline(0),
            sqlx::query(sql::REFRESH_STATISTICS).fetch_one(&mut *conn)
        )?;
        Ok(row.try_get("analyzed")?)
    }

    /// Sends the commands of one domain atomically; returns their msg_ids in input order.
    pub async fn send(&self, domain: &str, batch: SendBatch) -> CoreResult<Vec<i64>> {
        batch.check()?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let n = batch.command_ids.len();
        let deadline = self.deadline(n);
        let mut conn = self.conn().await?;
        if batch.is_plain() {
            if let Some(text) = sql::for_command_queue(sql::SEND_COMMANDS_DIRECT, domain) {
                match timed!(
                    conn,
                    deadline,
                    Self::send_direct(&mut *conn, text, domain, &batch, None)
                ) {
                    // The queue or the schema is missing, or a command_id is taken: nothing was
                    // written, and the function below creates the queue or names the problem.
                    Err(e) if matches!(e.sqlstate(), Some("42P01" | "23505")) => {}
                    other => return other,
                }
            }
        }
        let rows = timed!(
            conn,
            deadline,
            sqlx::query(sql::SEND_COMMANDS)
                .bind(domain)
                .bind(batch.command_ids)
                .bind(batch.command_types)
                .bind(batch.messages)
                .bind(batch.correlation_ids)
                .bind(batch.reply_tos)
                .bind(batch.max_attempts)
                .bind(batch.batch_ids)
                .fetch_all(&mut *conn)
        )?;
        if rows.len() != n {
            return Err(CoreError::Invalid {
                field: "send_commands",
                reason: format!("{} msg_ids returned for {} commands", rows.len(), n),
            });
        }
        rows.iter().map(|r| Ok(r.try_get("msg_id")?)).collect()
    }

    /// Sends `units` in order, each atomically in its own transaction, with up to `depth`
    /// statements running at once: plain units (see `send_commands_direct`) start while the ones
    /// before them still run, but each commits only after every unit before it did, so a failure
    /// leaves exactly the units before the failing one sent. Any other unit (batch ids, reply
    /// queues), and a plain one whose statement needs the function after all (queue to create,
    /// duplicate to name), runs as `send` runs it, with nothing else in flight: the function's
    /// row locks (batch counters, queue creation) could otherwise wait on an uncommitted unit
    /// that waits for its turn to commit. Returns each unit's msg_ids, in unit order.
    pub async fn send_ordered(&self, units: Vec<SendUnit>, depth: usize) -> Result<Vec<Vec<i64>>, SendFailure> {
        let mut sent: Vec<Vec<i64>> = Vec::with_capacity(units.len());
        let mut queue: VecDeque<SendUnit> = units.into();
        let mut inflight: VecDeque<JoinHandle<Opened>> = VecDeque::new();
        loop {
            // Fill the pipeline with plain units, each with msg_ids and vt reserved in unit order
            // on the connection its transaction then runs on. While units are in flight, a
            // connection is waited for only until the oldest unit's statement ends (its commit
            // frees one): so the pipeline moves on with a pool of one, or with other callers
            // holding the rest. A unit whose reservation fails (no queue yet, ...) goes alone
            // through `send` below.
            let mut front_done: Option<Opened> = None;
            while front_done.is_none() && inflight.len() < depth.max(1) {
                let Some((domain, batch)) = queue.front() else { break };
                if batch.check().is_err() || !batch.is_plain() {
                    break;
                }
                let (Some(text), Some(reserve)) = (
                    sql::for_command_queue(sql::SEND_COMMANDS_DIRECT, domain),
                    sql::for_command_queue(sql::RESERVE_MSG_IDS, domain),
                ) else {
                    break;
                };
                let n = batch.len();
                let acquired = match inflight.front_mut() {
                    None => self.pool.acquire().await,
                    Some(front) => {
                        tokio::select! {
                            joined = front => {
                                inflight.pop_front();
                                front_done = Some(Self::joined(joined));
                                break;
                            }
                            acquired = self.pool.acquire() => acquired,
                        }
                    }
                };
                let Ok(mut conn) = acquired else { break };
                let deadline = self.deadline(n);
                let reserved = tokio::time::timeout(deadline, Self::reserve(&mut *conn, reserve, n)).await;
                let Ok(Ok(reserved)) = reserved else {
                    if reserved.is_err() {
                        // No answer: the connection is abandoned, the unit goes through `send`.
                        drop(conn.detach());
                    }
                    break;
                };
                let unit = queue.pop_front().expect("front exists");
                inflight.push_back(tokio::spawn(Self::open(conn, text, unit, reserved, deadline)));
            }
            let first = match front_done {
                Some(opened) => Ok(opened),
                None => match inflight.pop_front() {
                    Some(handle) => Err(handle),
                    None => {
                        let Some(unit) = queue.pop_front() else {
                            break;
                        };
                        self.send_alone(&mut sent, unit).await?;
                        continue;
                    }
                },
            };
            let opened = match first {
                Ok(opened) => opened,
                Err(handle) => Self::joined(handle.await),
            };
            let Opened { unit, result } = opened;
            let error = match result {
                // A commit with no answer is dropped with its transaction: sqlx rolls back what
                // it can and closes the connection (see RCMD-PATCH.md). Its outcome is unknown,
                // reported as a connection error (a resend of the same command_ids names them
                // as duplicates if they were written after all).
                Ok((tx, ids)) => match tokio::time::timeout(self.call_timeout, tx.commit()).await {
                    Ok(Ok(())) => {
                        sent.push(ids);
                        continue;
                    }
                    Ok(Err(e)) => CoreError::from(e),
                    Err(_) => no_answer(self.call_timeout),
                },
                Err(e) => e,
            };
            // Nothing behind a unit that did not commit may commit before it: roll back what is
            // in flight and put it back in order.
            let mut behind = Vec::with_capacity(inflight.len());
            for handle in inflight.drain(..) {
                let opened = Self::joined(handle.await);
                if let Ok((tx, _)) = opened.result {
                    // A failed (or unanswered, then dropped) rollback leaves nothing behind
                    // either: the connection is closed.
                    let _ = tokio::time::timeout(self.call_timeout, tx.rollback()).await;
                }
                behind.push(opened.unit);
            }
            let (domain, batch) = unit;
            if !matches!(error.sqlstate(), Some("42P01" | "23505")) {
                return Err(SendFailure {
                    index: sent.len(),
                    domain,
                    error,
                });
            }
            self.send_alone(&mut sent, (domain, batch)).await?;
            for unit in behind.into_iter().rev() {
                queue.push_front(unit);
            }
        }
        Ok(sent)
    }

    /// Sends one unit as `send` does (nothing else in flight) and appends its msg_ids to `sent`.
    async fn send_alone(&self, sent: &mut Vec<Vec<i64>>, (domain, batch): SendUnit) -> Result<(), SendFailure> {
        match self.send(&domain, batch).await {
            Ok(ids) => {
                sent.push(ids);
                Ok(())
            }
            Err(error) => Err(SendFailure {
                index: sent.len(),
                domain,
                error,
            }),
        }
    }

    /// `n` msg_ids of a queue in order, and the server's time in microseconds
    /// (`reserve_msg_ids`, the text for the domain).
    async fn reserve<'e, E>(executor: E, text: String, n: usize) -> CoreResult<(Vec<i64>, i64)>
    where
        E: Executor<'e, Database = Postgres>,
    {
        let n = i32::try_from(n).map_err(|_| CoreError::Invalid {
            field: "send unit",
            reason: format!("{n} commands in one unit"),
        })?;
        let row = sqlx::query(AssertSqlSafe(text)).bind(n).fetch_one(executor).await?;
        let ids: Vec<i64> = row.try_get("msg_ids")?;
        if ids.len() != n as usize {
            return Err(CoreError::Protocol(format!("{} msg_ids reserved for {n}", ids.len())));
        }
        Ok((ids, row.try_get("vt_us")?))
    }

    /// Runs a plain unit's statement in a new transaction on `conn` and leaves it open; with no
    /// answer within `deadline` the transaction is dropped (see the commit in `send_ordered`).
    async fn open(
        conn: PoolConnection<Postgres>,
        text: String,
        unit: SendUnit,
        reserved: (Vec<i64>, i64),
        deadline: Duration,
    ) -> Opened {
        let result = tokio::time::timeout(deadline, async {
            let mut tx = Transaction::begin(conn, None).await?;
            let ids = Self::send_direct(&mut *tx, text, &unit.0, &unit.1, Some(reserved)).await?;
            Ok((tx, ids))
        })
        .await
        .unwrap_or_else(|_| Err(no_answer(deadline)));
        Opened { unit, result }
    }

    fn joined(joined: Result<Opened, JoinError>) -> Opened {
        match joined {
            Ok(opened) => opened,
            // The task owned the unit; a panic in it is a bug of ours, reported as such.
            Err(e) => Opened {
                unit: (String::new(), SendBatch::default()),
                result: Err(CoreError::Protocol(format!("send task failed: {e}"))),
            },
        }
    }

    /// `send_commands_direct` (the text for `domain`), with msg_ids and vt reserved or not;
    /// msg_ids in input order.
    async fn send_direct<'e, E>(
        executor: E,
        text: String,
        domain: &str,
        batch: &SendBatch,
        reserved: Option<(Vec<i64>, i64)>,
    ) -> CoreResult<Vec<i64>>
    where
        E: Executor<'e, Database = Postgres>,
    {
        let row = sqlx::query(AssertSqlSafe(text))
            .bind(domain)
            .bind(&batch.command_ids[..])
            .bind(&batch.command_types[..])
            .bind(&batch.messages[..])
            .bind(&batch.correlation_ids[..])
            .bind(&batch.max_attempts[..])
            .bind(reserved.as_ref().map(|r| &r.0[..]))
            .bind(reserved.as_ref().map(|r| r.1))
            .fetch_one(executor)
            .await?;
        let msg_ids: Vec<i64> = row.try_get("msg_ids")?;
        if msg_ids.len() != batch.len() {
            return Err(CoreError::Protocol(format!(
                "{} msg_ids returned for {} commands",
                msg_ids.len(),
                batch.len()
            )));
        }
        Ok(msg_ids)
    }

    /// Claims up to `qty` commands for `vt` seconds, in two transactions on one connection:
    /// the messages are leased and committed at once, so the queue rows are locked only while
    /// they are read (other claims walk past locked rows one by one), then the leased
    /// messages' commands are claimed. If the second step fails, the leases expire and
    /// the messages come back with their attempts untouched: no handler ran.
    pub async fn claim(&self, domain: &str, vt: i32, qty: i32, default_max_attempts: i32) -> CoreResult<Vec<Claimed>> {
        if qty <= 0 {
            return Ok(Vec::new());
        }
        let deadline = self.deadline(qty as usize);
        let mut conn = self.conn().await?;
        let leased: Option<Vec<i64>> = timed!(
            conn,
            deadline,
            sqlx::query_scalar(sql::LEASE_MESSAGES)
                .bind(domain)
                .bind(vt)
                .bind(qty)
                .fetch_one(&mut *conn)
        )?;
        let Some(msg_ids) = leased.filter(|ids| !ids.is_empty()) else {
            return Ok(Vec::new());
        };
        let rows = timed!(
            conn,
            deadline,
            sqlx::query(sql::CLAIM_LEASED)
                .bind(domain)
                .bind(msg_ids)
                .bind(default_max_attempts)
                .fetch_all(&mut *conn)
        )?;
        rows.iter().map(Claimed::from_row).collect()
    }

    /// Applies outcomes in one transaction; returns the (command_id, new status) of those the
    /// fence let through. A flush of SUCCESS outcomes only goes through `complete_commands_v1`
    /// (fewer columns, no failure audit kinds), any other through `finish_commands_v1`.
    /// `default_max_attempts` only fills the audit details of commands sent without one.
    pub async fn finish(
        &self,
        domain: &str,
        reports: Vec<Report>,
        default_max_attempts: i32,
    ) -> CoreResult<Vec<(Uuid, String)>> {
        let cols = FinishColumns::from_reports(reports);
        if cols.is_empty() {
            return Ok(Vec::new());
        }
        let deadline = self.deadline(cols.command_ids.len());
        let query = if cols.all_success() {
            // The common flush: the statement without the failure columns and audit kinds.
            sqlx::query(sql::COMPLETE_COMMANDS)
                .bind(domain)
                .bind(cols.command_ids)
                .bind(cols.msg_ids)
                .bind(cols.attempts)
                .bind(cols.results)
                .bind(cols.created_at_us)
        } else {
            sqlx::query(sql::FINISH_COMMANDS)
                .bind(domain)
                .bind(cols.command_ids)
                .bind(cols.msg_ids)
                .bind(cols.attempts)
                .bind(cols.outcomes)
                .bind(cols.results)
                .bind(cols.error_types)
                .bind(cols.error_codes)
                .bind(cols.error_msgs)
                .bind(cols.error_details)
                .bind(cols.backoffs)
                .bind(default_max_attempts)
                .bind(cols.created_at_us)
        };
        // One statement, one transaction: with no answer to it (its commit included) the
        // outcome is unknown, and the flusher retries on a fresh connection. That is safe: an
        // outcome applied once is fenced the second time (its lease is gone), and one never
        // applied is applied by the retry or, failing that, redelivered when its lease expires.
        let mut conn = self.conn().await?;
        let rows = timed!(conn, deadline, query.fetch_all(&mut *conn))?;
        rows.iter()
            .map(|r| Ok((r.try_get("command_id")?, r.try_get("status")?)))
            .collect()
    }

    fn lease_columns(leases: &[Lease]) -> (Vec<Uuid>, Vec<i64>, Vec<i32>, Vec<i64>) {
        (
            leases.iter().map(|l| l.command_id).collect(),
            leases.iter().map(|l| l.msg_id).collect(),
            leases.iter().map(|l| l.attempt).collect(),
            leases.iter().map(|l| l.created_at_us).collect(),
        )
    }

    /// Pushes the visibility of still-held leases `seconds` into the future.
    pub async fn extend(&self, domain: &str, leases: &[Lease], seconds: i32) -> CoreResult<i32> {
        if leases.is_empty() {
            return Ok(0);
        }
        let (ids, msgs, atts, created) = Self::lease_columns(leases);
        let mut conn = self.conn().await?;
        let row = timed!(
            conn,
            self.deadline(leases.len()),
            sqlx::query(sql::EXTEND_LEASES)
                .bind(domain)
                .bind(ids)
                .bind(msgs)
                .bind(atts)
                .bind(seconds)
                .bind(created)
                .fetch_one(&mut *conn)
        )?;
        Ok(row.try_get("extended")?)
    }

    /// Gives unstarted leases back: attempt undone, message visible at once.
    pub async fn release(&self, domain: &str, leases: &[Lease]) -> CoreResult<i32> {
        if leases.is_empty() {
            return Ok(0);
        }
        let (ids, msgs, atts, created) = Self::lease_columns(leases);
        let mut conn = self.conn().await?;
        let row = timed!(
            conn,
            self.deadline(leases.len()),
            sqlx::query(sql::RELEASE_COMMANDS)
                .bind(domain)
                .bind(ids)
                .bind(msgs)
                .bind(atts)
                .bind(created)
                .fetch_one(&mut *conn)
        )?;
        Ok(row.try_get("released")?)
    }

    /// A listener on `channel`, on a connection of its own (a one-connection pool of its own, so
    /// a listener abandoned on a silent connection never holds a slot of the engine's pool:
    /// sqlx's `UNLISTEN` on drop waits there until the kernel gives up on the connection).
    pub async fn listener(&self, channel: &str) -> CoreResult<PgListener> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(self.call_timeout)
            .connect_lazy_with(self.opts.clone());
        let listen = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(channel).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        match tokio::time::timeout(self.call_timeout, listen).await {
            Ok(listener) => Ok(listener?),
            Err(_) => Err(no_answer(self.call_timeout)),
        }
    }

    /// Checks that a listener's connection still answers, within the call deadline.
    pub async fn check_listener(&self, listener: &mut PgListener) -> CoreResult<()> {
        match tokio::time::timeout(self.call_timeout, sqlx::query("SELECT 1").execute(listener)).await {
            Ok(done) => done.map(|_| ()).map_err(CoreError::from),
            Err(_) => Err(no_answer(self.call_timeout)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(dsn: &str, call_timeout: Duration) -> Engine {
        let mut cfg = EngineConfig::new(dsn);
        cfg.call_timeout = call_timeout;
        cfg.acquire_timeout = call_timeout;
        Engine::connect_lazy(&cfg).unwrap()
    }

    #[test]
    fn deadlines_grow_with_rows_up_to_twice_the_call_timeout() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let e = engine("postgresql://nobody@127.0.0.1:1/none", Duration::from_secs(10));
        assert_eq!(e.deadline(0), Duration::from_secs(10));
        assert_eq!(e.deadline(1000), Duration::from_secs(11));
        assert_eq!(e.deadline(usize::MAX), Duration::from_secs(20));
    }

    #[test]
    fn a_server_that_never_answers_fails_the_call_within_its_deadline() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            // Accepts connections and never says a word (holds them open).
            let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = silent.local_addr().unwrap().port();
            let held = tokio::spawn(async move {
                let mut open = Vec::new();
                while let Ok((sock, _)) = silent.accept().await {
                    open.push(sock);
                }
            });
            let e = engine(
                &format!("postgresql://nobody@127.0.0.1:{port}/none"),
                Duration::from_millis(300),
            );
            let t0 = std::time::Instant::now();
            let err = e.ensure_queue("q").await.unwrap_err();
            assert!(matches!(err, CoreError::Connection(_)), "{err:?}");
            assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
            held.abort();
        });
    }

    #[test]
    fn send_batch_checks_column_lengths() {
        let mut b = SendBatch::default();
        assert!(b.check().is_ok());
        b.command_ids.push(Uuid::nil());
        assert!(b.check().is_err());
        b.command_types.push("T".into());
        b.messages.push("{}".into());
        b.correlation_ids.push(Uuid::nil());
        b.reply_tos.push(None);
        b.max_attempts.push(None);
        b.batch_ids.push(None);
        assert!(b.check().is_ok());
    }
}
