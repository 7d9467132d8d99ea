//! The PostgreSQL store: several CA processes can share one database.
//!
//! A thin adapter, as the sled one is: each write reads the records it touches inside its
//! transaction, asks the registration authority's rule ([`crate::ra::rules`]), and applies the
//! writes the rule returns. The invariants are the database's own (unique constraints, a check
//! on the line count, conditional updates; see [`schema`]), so they hold with any number of
//! writers; the rules only decide which refusal a device is told. Every writing transaction
//! first locks the audit head row, so audit entries chain in commit order across processes.
//!
//! The [`Store`] trait is synchronous (sled is); this store runs tokio-postgres on a small
//! runtime of its own and waits for each call's answer on the calling thread.

mod batch;
pub mod schema;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::runtime::{Handle, Runtime};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, Row, Transaction};
use zeroize::Zeroizing;

use super::{Index, IndexEntry, RawAudit, RawRecord, Store, StoreError, Write, Written};
use crate::audit::AuditKey;
use crate::ra::rules::{self, AuditEvent, ResetOutcome};
use crate::records::{
    AuditEntry, BdkRecord, DeviceRecord, DeviceStatus, LineRecord, OperatorRevocation, PoolEntry,
    ResetRecord, RevokedCert, SecretRecord, to_cbor,
};

/// Every table of records, with its primary key (for ordered walks and counts). The `nodes`
/// table (which processes are serving now) holds no record and is left out.
const TABLES: [(&str, &str); 12] = [
    ("lines", "id"),
    ("devices", "serial"),
    ("keys", "key_hash"),
    ("tokens", "line, token_id"),
    ("secret_keys", "index_tag"),
    ("secret_versions", "serial, version"),
    ("secret_pool", "key_id"),
    ("device_resets", "serial, seq"),
    ("operator_revocations", "name"),
    ("audit", "seq"),
    ("audit_head", "id"),
    ("dukpt_bdks", "id"),
];

/// One query parameter.
type P<'a> = &'a (dyn tokio_postgres::types::ToSql + Sync);

/// How long one call may wait for the database before it is `unavailable`.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections per store (the committer uses one; readers share the rest).
const MAX_CONNECTIONS: usize = 8;
/// Attempts of a write that met another writer (unique violation, serialization failure,
/// deadlock) before the conflict is reported.
const CONFLICT_ATTEMPTS: usize = 5;
/// Rows per page when a whole table is walked.
const PAGE: i64 = 2000;
/// How long a caller waits for an answer on its own thread before it gives that thread back to
/// its async runtime (an answer within this is the usual case: then nothing more is done).
const QUICK_ANSWER: Duration = Duration::from_millis(5);
/// Calls that may wait longer than [`QUICK_ANSWER`] at once while the database answers nothing.
/// Past that many, and with no call answered for [`STALLED`], the database is not answering: a
/// new call is refused as `unavailable` at once, before anything is sent, rather than holding
/// one more thread for up to [`CALL_TIMEOUT`]. A database that is only slow (a busy machine, a
/// burst of requests) keeps answering, and its callers keep waiting.
const SLOW_CALLS_MAX: usize = 32;
/// How long the database may answer nothing, with [`SLOW_CALLS_MAX`] calls waiting, before new
/// calls are refused.
const STALLED: Duration = Duration::from_secs(1);
/// Calls that may wait longer than [`QUICK_ANSWER`] at once in any case (each holds a thread).
const SLOW_CALLS_HARD: usize = 256;

/// The store's calls in flight: how many wait past [`QUICK_ANSWER`], and when the database
/// last answered one.
#[derive(Debug)]
struct Waits {
    slow: AtomicUsize,
    epoch: Instant,
    /// Milliseconds from `epoch` to the latest answer.
    answered: AtomicU64,
}

impl Waits {
    fn new() -> Self {
        Waits {
            slow: AtomicUsize::new(0),
            epoch: Instant::now(),
            answered: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn answer(&self) {
        self.answered.fetch_max(self.now_ms(), Ordering::SeqCst);
    }

    /// Why a new call is not to be sent, if it is not.
    fn refusal(&self) -> Option<String> {
        let waiting = self.slow.load(Ordering::SeqCst);
        if waiting < SLOW_CALLS_MAX {
            return None;
        }
        if waiting >= SLOW_CALLS_HARD {
            return Some(format!(
                "{waiting} calls already wait for the database; not sending more until they are answered"
            ));
        }
        let quiet = self
            .now_ms()
            .saturating_sub(self.answered.load(Ordering::SeqCst));
        (u128::from(quiet) >= STALLED.as_millis()).then(|| {
            format!(
                "the database has answered nothing for {quiet} ms while {waiting} calls wait; not sending more until it does"
            )
        })
    }
}

/// Where the database is and how to reach it.
#[derive(Clone)]
pub struct PgConfig {
    /// `postgresql://USER@HOST:PORT/DB?sslmode=...` or the key=value form; no password.
    pub url: String,
    /// The password (from a file or the environment; never from config.toml).
    pub password: Option<Zeroizing<String>>,
    /// PEM file of the CA that issued the server's certificate: with it, TLS is used and the
    /// server verified (host name and chain); without it, no TLS.
    pub ca_file: Option<PathBuf>,
    /// The schema that holds Imprint's tables (created by `init`).
    pub schema: String,
}

impl std::fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConfig")
            .field("url", &self.url)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("ca_file", &self.ca_file)
            .field("schema", &self.schema)
            .finish()
    }
}

impl PgConfig {
    /// Checks the URL (it must carry no password) and the schema name; builds the driver's
    /// configuration.
    fn driver_config(&self) -> Result<tokio_postgres::Config, StoreError> {
        let mut c: tokio_postgres::Config = self
            .url
            .parse()
            .map_err(|e| StoreError::Backend(format!("store url {:?}: {e}", redact(&self.url))))?;
        if c.get_password().is_some() {
            return Err(StoreError::Backend(
                "the store url must not carry a password: put it in a file named by [store] password_file, or in IMPRINT_STORE_PASSWORD".into(),
            ));
        }
        if let Some(p) = &self.password {
            c.password(p.as_bytes());
        }
        if c.get_connect_timeout().is_none() {
            c.connect_timeout(CONNECT_TIMEOUT);
        }
        c.application_name("imprint-ca");
        if c.get_ssl_mode() == tokio_postgres::config::SslMode::Require && self.ca_file.is_none() {
            return Err(StoreError::Backend(
                "sslmode=require needs [store] ca_file: the CA that issued the database's certificate".into(),
            ));
        }
        check_schema_name(&self.schema)?;
        Ok(c)
    }
}

/// The URL without anything after a colon in its user part (a password).
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let user = &url[s + 3..at];
            let user = user.split(':').next().unwrap_or("");
            format!("{}{user}{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

fn check_schema_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else {
        Err(StoreError::Backend(format!(
            "store schema {name:?} must be 1 to 63 characters of a-z 0-9 _, not starting with a digit"
        )))
    }
}

/// Counts a call in [`Waits::slow`] while it lives. The first of a run of slow calls starts the
/// database's silence from now, not from the last answer (which may be long ago after an idle
/// spell): a burst after a quiet time is waited for like any other.
struct SlowCall<'a>(&'a Waits);

impl<'a> SlowCall<'a> {
    fn new(waits: &'a Waits) -> Self {
        if waits.slow.fetch_add(1, Ordering::SeqCst) == 0 {
            waits.answer();
        }
        SlowCall(waits)
    }
}

impl Drop for SlowCall<'_> {
    fn drop(&mut self) {
        self.0.slow.fetch_sub(1, Ordering::SeqCst);
    }
}

/// PostgreSQL-backed [`Store`].
pub struct PgStore {
    rt: Option<Runtime>,
    handle: Handle,
    pool: Arc<Pool>,
    target: String,
    /// The calls in flight (see [`SLOW_CALLS_MAX`]).
    waits: Arc<Waits>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Dropping a runtime blocks; a store may be dropped on an async worker.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl PgStore {
    /// Connects and checks that the schema is the one this build knows.
    pub fn open(config: &PgConfig) -> Result<Self, StoreError> {
        let store = Self::connect(config)?;
        let found = store.run(|pool| async move { schema_version(&pool).await })?;
        match found {
            Some(v) if v == schema::SCHEMA_VERSION => Ok(store),
            None => Err(StoreError::Schema(format!(
                "the database at {} has no Imprint schema {:?}: run `ca-server init --store URL` (a new CA) or `ca-server store migrate --dir DIR`",
                store.target, config.schema
            ))),
            Some(v) if v < schema::SCHEMA_VERSION => Err(StoreError::Schema(format!(
                "the schema {:?} at {} is version {v}, older than this build's {}: run `ca-server store migrate --dir DIR`",
                config.schema,
                store.target,
                schema::SCHEMA_VERSION
            ))),
            Some(v) => Err(StoreError::Schema(format!(
                "the schema {:?} at {} is version {v}, newer than this build's {}: run a ca-server that knows it",
                config.schema,
                store.target,
                schema::SCHEMA_VERSION
            ))),
        }
    }

    /// Creates the schema if needed and applies the migrations it lacks. Returns the version it
    /// found (0: none).
    pub fn migrate(config: &PgConfig) -> Result<i32, StoreError> {
        let store = Self::connect(config)?;
        let name = config.schema.clone();
        store.run(move |pool| async move { migrate(&pool, &name).await })
    }

    /// The version of the schema in the database (`None`: no Imprint schema there).
    pub fn installed_version(config: &PgConfig) -> Result<Option<i32>, StoreError> {
        let store = Self::connect(config)?;
        store.run(|pool| async move { schema_version(&pool).await })
    }

    /// Removes the schema and everything in it (the simulator's and the tests' own schemas).
    pub fn drop_schema(config: &PgConfig) -> Result<(), StoreError> {
        let store = Self::connect(config)?;
        let name = config.schema.clone();
        store.run(move |pool| async move {
            let conn = pool.get().await?;
            conn.client()?
                .batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                .await
                .map_err(pg)
        })
    }

    /// Where the store is, for messages (no password).
    pub fn target(&self) -> &str {
        &self.target
    }

    fn connect(config: &PgConfig) -> Result<Self, StoreError> {
        let driver = config.driver_config()?;
        let tls = match &config.ca_file {
            None => None,
            Some(path) => Some(tls_connector(path)?),
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("postgres")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Backend(format!("cannot start the database runtime: {e}")))?;
        let handle = rt.handle().clone();
        let target = redact(&config.url);
        let pool = Arc::new(Pool {
            config: driver,
            tls,
            schema: config.schema.clone(),
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            warnings: Arc::default(),
            suspect: AtomicBool::new(false),
            audit_key: std::sync::OnceLock::new(),
        });
        let store = PgStore {
            rt: Some(rt),
            handle,
            pool,
            target,
            waits: Arc::new(Waits::new()),
        };
        // Fail now, naming the database, rather than at the first request.
        store.run(|pool| async move { pool.get().await.map(|_| ()) })?;
        Ok(store)
    }

    /// Runs `f` on the store's runtime and waits for its answer on this thread.
    ///
    /// The store's API is synchronous and is called from the CA's async workers. A database
    /// that is slow to answer (lost, frozen, or waiting for a synchronous standby that is away)
    /// must not hold those workers: with as many waiting calls as workers, every door would
    /// stall, the ones that need no database too, and the runtime's timers with them. So a call
    /// not answered within [`QUICK_ANSWER`] hands its worker back to the runtime
    /// (`block_in_place`) and waits on its own; and while [`SLOW_CALLS_MAX`] calls wait so, a
    /// new call is refused as `unavailable` before anything is sent.
    fn run<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(Arc<Pool>) -> Fut,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
        T: Send + 'static,
    {
        if let Some(why) = self.waits.refusal() {
            return Err(StoreError::Unavailable(why));
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let pool = self.pool.clone();
        let waits = self.waits.clone();
        let fut = f(self.pool.clone());
        self.handle.spawn(async move {
            let call = async {
                // After a commit the standby did not confirm, nothing is read or written until
                // a commit made since has been confirmed: then everything before it is on the
                // standby too (its WAL is replayed in order).
                if pool.suspect.load(Ordering::SeqCst) {
                    barrier(&pool).await?;
                }
                let warnings = pool.warnings.load(Ordering::SeqCst);
                let r = fut.await;
                if r.is_ok() && pool.warnings.load(Ordering::SeqCst) != warnings {
                    pool.suspect.store(true, Ordering::SeqCst);
                    return Err(StoreError::Unknown(
                        "the database warned while this call ran (a commit not confirmed by the synchronous standby?); to be read again".into(),
                    ));
                }
                r
            };
            let r = match tokio::time::timeout(CALL_TIMEOUT, call).await {
                Ok(r) => r,
                Err(_) => Err(StoreError::Unavailable(format!(
                    "no answer from the database within {} s",
                    CALL_TIMEOUT.as_secs()
                ))),
            };
            if !matches!(r, Err(StoreError::Unavailable(_))) {
                waits.answer();
            }
            let _ = tx.send(r);
        });
        let ended = || StoreError::Backend("the database task ended without an answer".into());
        match rx.recv_timeout(QUICK_ANSWER) {
            Ok(r) => r,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(ended()),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let _slow = SlowCall::new(&self.waits);
                crate::blocking::off_the_runtime(|| rx.recv()).map_err(|_| ended())?
            }
        }
    }

    /// Runs a writing transaction again while it meets another writer.
    fn write<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: Fn(Arc<Pool>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
        T: Send + 'static,
    {
        self.run(move |pool| async move {
            let mut attempt = 0;
            loop {
                attempt += 1;
                match f(pool.clone()).await {
                    Err(StoreError::Conflict(why)) if attempt < CONFLICT_ATTEMPTS => {
                        tracing::debug!(attempt, error = %why, "write met another writer; again");
                    }
                    other => return other,
                }
            }
        })
    }
}

fn tls_connector(
    path: &std::path::Path,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    let pem = std::fs::read(path)
        .map_err(|e| StoreError::Backend(format!("store ca_file {}: {e}", path.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    let mut n = 0;
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
        let cert: rustls::pki_types::CertificateDer<'static> = cert
            .map_err(|e| StoreError::Backend(format!("store ca_file {}: {e}", path.display())))?;
        roots
            .add(cert)
            .map_err(|e| StoreError::Backend(format!("store ca_file {}: {e}", path.display())))?;
        n += 1;
    }
    if n == 0 {
        return Err(StoreError::Backend(format!(
            "store ca_file {}: no certificate in it",
            path.display()
        )));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| StoreError::Backend(format!("TLS: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// What a driver error means for the caller.
fn pg(e: tokio_postgres::Error) -> StoreError {
    match e.code() {
        Some(c)
            if *c == SqlState::UNIQUE_VIOLATION
                || *c == SqlState::T_R_SERIALIZATION_FAILURE
                || *c == SqlState::T_R_DEADLOCK_DETECTED =>
        {
            StoreError::Conflict(e.to_string())
        }
        Some(c)
            if *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CRASH_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW
                || *c == SqlState::READ_ONLY_SQL_TRANSACTION
                || *c == SqlState::TOO_MANY_CONNECTIONS
                || c.code().starts_with("08") =>
        {
            StoreError::Unavailable(e.to_string())
        }
        // The server's own message ("db error" alone says nothing).
        Some(_) => StoreError::Backend(match e.as_db_error() {
            Some(d) => format!("{}: {}", d.code().code(), d.message()),
            None => e.to_string(),
        }),
        // No SQLSTATE: the connection failed or closed (refused, reset, timed out).
        None => StoreError::Unavailable(e.to_string()),
    }
}

/// A small connection pool: idle clients are reused; a closed one is dropped and a new one made.
struct Pool {
    config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    schema: String,
    idle: Mutex<Vec<(Client, Stmts)>>,
    permits: Arc<Semaphore>,
    /// WARNING notices any connection received. PostgreSQL answers a commit whose wait for the
    /// synchronous standby was cancelled with success and a warning ("The transaction has
    /// already committed locally, but might not have been replicated to the standby"): such a
    /// commit is not known to be durable, and the call that saw it fails as `Unknown`.
    warnings: Arc<AtomicU64>,
    /// Set by such a warning: the next call first commits a barrier (see [`barrier`]).
    suspect: AtomicBool,
    /// The key that seals each audit entry written ([`Store::set_audit_key`]).
    audit_key: std::sync::OnceLock<AuditKey>,
}

/// A connection's prepared statements, by SQL text: each statement is parsed and planned once
/// per connection instead of once per call.
type Stmts = Arc<Mutex<std::collections::HashMap<String, tokio_postgres::Statement>>>;

struct Conn {
    client: Option<Client>,
    stmts: Stmts,
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
    /// Set while a transaction opened by hand may be open on it: dropped so (its task
    /// cancelled, say, by the call's time limit), the connection is closed rather than handed
    /// to the next caller inside that transaction.
    open: AtomicBool,
}

/// Where a statement runs (a transaction, or the connection itself), with the connection's
/// statement cache.
enum On<'a> {
    Tx(&'a Transaction<'a>),
    Client(&'a Client),
}

struct Db<'a> {
    on: On<'a>,
    stmts: &'a Stmts,
}

/// Runs the driver method `$m` where `$db` runs its statements.
macro_rules! on_either {
    ($db:ident, $m:ident, $($arg:expr),*) => {
        match &$db.on {
            On::Tx(t) => t.$m($($arg),*).await,
            On::Client(c) => c.$m($($arg),*).await,
        }
        .map_err(pg)
    };
}

impl Db<'_> {
    /// Prepares (or finds in the cache) each statement, so that a pipelined flight of them
    /// leaves in the order it is written.
    async fn prepare(&self, sqls: &[&str]) -> Result<(), StoreError> {
        for sql in sqls {
            self.stmt(sql).await?;
        }
        Ok(())
    }

    /// [`Db::all`] when `run`, else no rows (and no statement sent).
    async fn all_if(&self, run: bool, sql: &str, params: &[P<'_>]) -> Result<Vec<Row>, StoreError> {
        if run {
            self.all(sql, params).await
        } else {
            Ok(Vec::new())
        }
    }

    /// [`Db::exec`] when `run`, else 0 rows (and no statement sent).
    async fn exec_if(&self, run: bool, sql: &str, params: &[P<'_>]) -> Result<u64, StoreError> {
        if run {
            self.exec(sql, params).await
        } else {
            Ok(0)
        }
    }

    async fn stmt(&self, sql: &str) -> Result<tokio_postgres::Statement, StoreError> {
        if let Some(s) = self.stmts.lock().ok().and_then(|m| m.get(sql).cloned()) {
            return Ok(s);
        }
        let s = on_either!(self, prepare, sql)?;
        if let Ok(mut m) = self.stmts.lock() {
            m.insert(sql.to_string(), s.clone());
        }
        Ok(s)
    }

    async fn opt(&self, sql: &str, params: &[P<'_>]) -> Result<Option<Row>, StoreError> {
        let s = self.stmt(sql).await?;
        on_either!(self, query_opt, &s, params)
    }

    async fn all(&self, sql: &str, params: &[P<'_>]) -> Result<Vec<Row>, StoreError> {
        let s = self.stmt(sql).await?;
        on_either!(self, query, &s, params)
    }

    async fn one(&self, sql: &str, params: &[P<'_>]) -> Result<Row, StoreError> {
        let s = self.stmt(sql).await?;
        on_either!(self, query_one, &s, params)
    }

    async fn exec(&self, sql: &str, params: &[P<'_>]) -> Result<u64, StoreError> {
        let s = self.stmt(sql).await?;
        on_either!(self, execute, &s, params)
    }

    /// A statement of the simple protocol (`BEGIN`, `COMMIT`), sent when first polled.
    async fn simple(&self, sql: &str) -> Result<(), StoreError> {
        on_either!(self, batch_execute, sql)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(c) = self.client.take()
            && !c.is_closed()
            && !self.open.load(Ordering::SeqCst)
            && let Ok(mut idle) = self.pool.idle.lock()
        {
            idle.push((c, self.stmts.clone()));
        }
    }
}

impl Conn {
    /// Closes the connection instead of returning it to the pool (it is inside a transaction
    /// that is not finished).
    fn discard(mut self) {
        self.client.take();
    }

    fn client(&self) -> Result<&Client, StoreError> {
        self.client
            .as_ref()
            .ok_or_else(|| StoreError::Backend("connection already returned".into()))
    }

    async fn transaction(&mut self) -> Result<Transaction<'_>, StoreError> {
        let c = self
            .client
            .as_mut()
            .ok_or_else(|| StoreError::Backend("connection already returned".into()))?;
        c.transaction().await.map_err(pg)
    }

    /// A transaction, and the connection's statement cache for it.
    async fn transaction_db(&mut self) -> Result<(Transaction<'_>, Stmts), StoreError> {
        let stmts = self.stmts.clone();
        Ok((self.transaction().await?, stmts))
    }

    /// Statements on the connection itself, through its cache.
    fn db(&self) -> Result<Db<'_>, StoreError> {
        Ok(Db {
            on: On::Client(self.client()?),
            stmts: &self.stmts,
        })
    }
}

impl Pool {
    async fn get(self: &Arc<Self>) -> Result<Conn, StoreError> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Backend("the connection pool is closed".into()))?;
        loop {
            let c = match self.idle.lock() {
                Ok(mut idle) => idle.pop(),
                Err(_) => None,
            };
            match c {
                Some((c, stmts)) if !c.is_closed() => {
                    return Ok(Conn {
                        client: Some(c),
                        stmts,
                        pool: self.clone(),
                        _permit: permit,
                        open: AtomicBool::new(false),
                    });
                }
                Some(_) => continue,
                None => break,
            }
        }
        let client = match &self.tls {
            Some(tls) => {
                let (client, conn) = self.config.connect(tls.clone()).await.map_err(pg)?;
                tokio::spawn(drive(conn, self.warnings.clone()));
                client
            }
            None => {
                let (client, conn) = self.config.connect(NoTls).await.map_err(pg)?;
                tokio::spawn(drive(conn, self.warnings.clone()));
                client
            }
        };
        // The schema name was checked to be a plain identifier.
        client
            .batch_execute(&format!(
                "SET search_path TO {}; SET synchronous_commit TO on",
                self.schema
            ))
            .await
            .map_err(pg)?;
        Ok(Conn {
            client: Some(client),
            stmts: Arc::default(),
            pool: self.clone(),
            _permit: permit,
            open: AtomicBool::new(false),
        })
    }
}

/// Drives a connection until it ends, counting the WARNING notices it receives in `warnings`
/// (they reach the counter before the answer they precede reaches its caller).
async fn drive<S, T>(mut conn: tokio_postgres::Connection<S, T>, warnings: Arc<AtomicU64>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use std::task::Poll;
    use tokio_postgres::AsyncMessage;
    use tokio_postgres::error::Severity;
    let ended = std::future::poll_fn(|cx| {
        loop {
            match conn.poll_message(cx) {
                Poll::Ready(Some(Ok(AsyncMessage::Notice(n)))) => {
                    if n.parsed_severity() == Some(Severity::Warning) {
                        warnings.fetch_add(1, Ordering::SeqCst);
                        tracing::warn!(
                            code = n.code().code(),
                            message = n.message(),
                            detail = n.detail().unwrap_or(""),
                            "the database warned"
                        );
                    }
                }
                Poll::Ready(Some(Ok(_))) => {}
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await;
    if let Err(e) = ended {
        tracing::warn!(error = %e, "database connection ended");
    }
}

/// Commits a write that changes nothing but needs the synchronous standby's confirmation like
/// any other; once it is confirmed without a warning, every commit before it is on the standby
/// too, and the pool is trusted again.
async fn barrier(pool: &Arc<Pool>) -> Result<(), StoreError> {
    let mut conn = pool.get().await?;
    let warnings = pool.warnings.load(Ordering::SeqCst);
    let tx = conn.transaction().await?;
    tx.execute(
        "UPDATE imprint_schema SET applied_at = applied_at WHERE version = (SELECT max(version) FROM imprint_schema)",
        &[],
    )
    .await
    .map_err(pg)?;
    tx.commit().await.map_err(pg)?;
    if pool.warnings.load(Ordering::SeqCst) != warnings {
        return Err(StoreError::Unknown(
            "the synchronous standby has not confirmed the database's commits yet".into(),
        ));
    }
    pool.suspect.store(false, Ordering::SeqCst);
    tracing::info!("the database's commits are confirmed again");
    Ok(())
}

async fn schema_version(pool: &Arc<Pool>) -> Result<Option<i32>, StoreError> {
    let conn = pool.get().await?;
    let c = conn.client()?;
    let exists: bool = c
        .query_one("SELECT to_regclass('imprint_schema') IS NOT NULL", &[])
        .await
        .map_err(pg)?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let v: Option<i32> = c
        .query_one("SELECT max(version) FROM imprint_schema", &[])
        .await
        .map_err(pg)?
        .get(0);
    Ok(Some(v.unwrap_or(0)))
}

async fn migrate(pool: &Arc<Pool>, name: &str) -> Result<i32, StoreError> {
    {
        let conn = pool.get().await?;
        conn.client()?
            .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {name}"))
            .await
            .map_err(pg)?;
    }
    let found = schema_version(pool).await?.unwrap_or(0);
    if found > schema::SCHEMA_VERSION {
        return Err(StoreError::Schema(format!(
            "the schema {name:?} is version {found}, newer than this build's {}",
            schema::SCHEMA_VERSION
        )));
    }
    let mut conn = pool.get().await?;
    for (version, sql) in schema::MIGRATIONS {
        if *version <= found {
            continue;
        }
        let tx = conn.transaction().await?;
        tx.batch_execute(sql).await.map_err(pg)?;
        tx.execute(
            "INSERT INTO imprint_schema (version) VALUES ($1)",
            &[version],
        )
        .await
        .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
    }
    Ok(found)
}

// ---------------------------------------------------------------------------------------------
// Rows

/// A u64 as the bigint that holds it, bit for bit.
fn i(v: u64) -> i64 {
    v as i64
}

/// The u64 a bigint holds.
fn u(v: i64) -> u64 {
    v as u64
}

fn ou(v: Option<i64>) -> Option<u64> {
    v.map(u)
}

fn oi(v: Option<u64>) -> Option<i64> {
    v.map(i)
}

const DEVICE_COLUMNS: &str =
    "serial, spki, certificate, line, token_id, enrolled_at, status, revoked_at";

/// The enrollment fast path's one read ([`Store::binding_of`]): the serial's record (NULLs
/// when none), the serial holding the key, and how many times the serial was reset. The
/// columns are [`DEVICE_COLUMNS`], written out so that the text is a constant (no string built
/// per enrollment).
const BINDING_OF: &str = "SELECT serial, spki, certificate, line, token_id, enrolled_at, status, revoked_at, (SELECT serial FROM keys WHERE key_hash = $2), (SELECT count(*) FROM device_resets r WHERE r.serial = $1) FROM (SELECT 1) one LEFT JOIN devices ON devices.serial = $1";

fn device_of(r: &Row) -> Result<DeviceRecord, StoreError> {
    let status: String = r.try_get(6).map_err(pg)?;
    Ok(DeviceRecord {
        serial: u(r.try_get(0).map_err(pg)?),
        spki: r.try_get(1).map_err(pg)?,
        certificate: r.try_get(2).map_err(pg)?,
        line: r.try_get(3).map_err(pg)?,
        token_id: r.try_get(4).map_err(pg)?,
        enrolled_at: u(r.try_get(5).map_err(pg)?),
        status: match status.as_str() {
            "revoked" => DeviceStatus::Revoked,
            "active" => DeviceStatus::Active,
            other => {
                return Err(StoreError::Corrupt {
                    tree: "devices",
                    reason: format!("status {other:?}"),
                });
            }
        },
        revoked_at: ou(r.try_get(7).map_err(pg)?),
    })
}

fn operator_revocation_of(r: &Row) -> Result<OperatorRevocation, StoreError> {
    Ok(OperatorRevocation {
        name: r.try_get(0).map_err(pg)?,
        revoked_at: u(r.try_get(1).map_err(pg)?),
        actor: r.try_get(2).map_err(pg)?,
    })
}

fn status_name(s: DeviceStatus) -> &'static str {
    match s {
        DeviceStatus::Active => "active",
        DeviceStatus::Revoked => "revoked",
    }
}

const LINE_COLUMNS: &str = "id, public_key, first_serial, last_serial, quota, rate, enrolled, active, created_at, secret_source";

fn line_of(r: &Row) -> Result<LineRecord, StoreError> {
    let rate: i32 = r.try_get(5).map_err(pg)?;
    Ok(LineRecord {
        id: r.try_get(0).map_err(pg)?,
        public_key: r.try_get(1).map_err(pg)?,
        first_serial: u(r.try_get(2).map_err(pg)?),
        last_serial: u(r.try_get(3).map_err(pg)?),
        quota: u(r.try_get(4).map_err(pg)?),
        rate: u32::try_from(rate).unwrap_or(0),
        enrolled: u(r.try_get(6).map_err(pg)?),
        active: r.try_get(7).map_err(pg)?,
        created_at: u(r.try_get(8).map_err(pg)?),
        secret_source: r
            .try_get::<_, String>(9)
            .map_err(pg)?
            .parse()
            .map_err(|e: String| StoreError::Corrupt {
                tree: "lines",
                reason: e,
            })?,
    })
}

const BDK_COLUMNS: &str = "id, algorithm, ciphertext, nonce, kcv, created_at, token_object";

fn bdk_of(r: &Row) -> Result<BdkRecord, StoreError> {
    Ok(BdkRecord {
        id: r.try_get(0).map_err(pg)?,
        algorithm: r.try_get(1).map_err(pg)?,
        ciphertext: r
            .try_get::<_, Option<Vec<u8>>>(2)
            .map_err(pg)?
            .unwrap_or_default(),
        nonce: r
            .try_get::<_, Option<Vec<u8>>>(3)
            .map_err(pg)?
            .unwrap_or_default(),
        kcv: r.try_get(4).map_err(pg)?,
        created_at: u(r.try_get(5).map_err(pg)?),
        token_object: r.try_get(6).map_err(pg)?,
    })
}

/// The sealed key's bytes as the table keeps them: none (NULL) for a key held in the token.
fn bdk_sealed(b: &BdkRecord) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
    match b.token_object {
        Some(_) => (None, None),
        None => (Some(b.ciphertext.clone()), Some(b.nonce.clone())),
    }
}

const SECRET_COLUMNS: &str = "serial, version, key_id, ciphertext, nonce, kcv, index_tag, source, created_at, delivered_at, confirmed_at, retired_at";

fn secret_of(r: &Row) -> Result<SecretRecord, StoreError> {
    Ok(SecretRecord {
        serial: u(r.try_get(0).map_err(pg)?),
        version: u(r.try_get(1).map_err(pg)?),
        key_id: r.try_get(2).map_err(pg)?,
        ciphertext: r.try_get(3).map_err(pg)?,
        nonce: r.try_get(4).map_err(pg)?,
        kcv: r.try_get(5).map_err(pg)?,
        index_tag: r.try_get(6).map_err(pg)?,
        source: r.try_get(7).map_err(pg)?,
        created_at: u(r.try_get(8).map_err(pg)?),
        delivered_at: ou(r.try_get(9).map_err(pg)?),
        confirmed_at: ou(r.try_get(10).map_err(pg)?),
        retired_at: ou(r.try_get(11).map_err(pg)?),
    })
}

const POOL_COLUMNS: &str = "key_id, ciphertext, nonce, kcv, index_tag, imported_at";

fn pool_of(r: &Row) -> Result<PoolEntry, StoreError> {
    Ok(PoolEntry {
        key_id: r.try_get(0).map_err(pg)?,
        ciphertext: r.try_get(1).map_err(pg)?,
        nonce: r.try_get(2).map_err(pg)?,
        kcv: r.try_get(3).map_err(pg)?,
        index_tag: r.try_get(4).map_err(pg)?,
        imported_at: u(r.try_get(5).map_err(pg)?),
    })
}

fn audit_of(r: &Row) -> Result<AuditEntry, StoreError> {
    Ok(AuditEntry {
        seq: u(r.try_get(0).map_err(pg)?),
        at: u(r.try_get(1).map_err(pg)?),
        event: r.try_get(2).map_err(pg)?,
        serial: ou(r.try_get(3).map_err(pg)?),
        actor: r.try_get(4).map_err(pg)?,
        detail: r.try_get(5).map_err(pg)?,
        prev_hash: r.try_get(6).map_err(pg)?,
        hash: r.try_get(7).map_err(pg)?,
        node: r.try_get(8).map_err(pg)?,
        mac: r.try_get(9).map_err(pg)?,
    })
}

// ---------------------------------------------------------------------------------------------
// Writing transactions

/// The audit chain's head, locked for the transaction.
type Chain = (u64, [u8; 32]);

async fn lock_head(db: &Db<'_>) -> Result<Chain, StoreError> {
    let r = db
        .one(
            "SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE",
            &[],
        )
        .await?;
    let hash: Vec<u8> = r.try_get(1).map_err(pg)?;
    let hash = <[u8; 32]>::try_from(hash.as_slice()).map_err(|_| StoreError::Corrupt {
        tree: "audit_head",
        reason: "hash is not 32 bytes".into(),
    })?;
    Ok((u(r.try_get(0).map_err(pg)?), hash))
}

async fn set_head(db: &Db<'_>, chain: &Chain) -> Result<(), StoreError> {
    db.exec(
        "UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1",
        &[&i(chain.0), &chain.1.as_slice()],
    )
    .await?;
    Ok(())
}

const INSERT_AUDIT: &str = "INSERT INTO audit (seq, at, event, serial, actor, detail, prev_hash, hash, node, mac) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";

/// An audit entry's column values.
struct AuditRow<'a> {
    seq: i64,
    at: i64,
    serial: Option<i64>,
    e: &'a AuditEntry,
}

impl<'a> AuditRow<'a> {
    fn of(e: &'a AuditEntry) -> Self {
        AuditRow {
            seq: i(e.seq),
            at: i(e.at),
            serial: oi(e.serial),
            e,
        }
    }

    fn params(&self) -> [P<'_>; 10] {
        [
            &self.seq,
            &self.at,
            &self.e.event,
            &self.serial,
            &self.e.actor,
            &self.e.detail,
            &self.e.prev_hash,
            &self.e.hash,
            &self.e.node,
            &self.e.mac,
        ]
    }
}

/// Appends the entry for `event` after `chain` and moves `chain` to it.
async fn append(
    db: &Db<'_>,
    chain: &mut Chain,
    event: &AuditEvent,
    key: Option<&AuditKey>,
) -> Result<AuditEntry, StoreError> {
    let entry = event.entry_after(chain, key);
    let row = AuditRow::of(&entry);
    db.exec(INSERT_AUDIT, &row.params()).await?;
    *chain = (entry.seq, entry.compute_hash());
    Ok(entry)
}

// ---------------------------------------------------------------------------------------------
// The trait

impl PgStore {
    fn query_rows<T, F>(&self, sql: String, params: Vec<i64>, f: F) -> Result<Vec<T>, StoreError>
    where
        F: Fn(&Row) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        self.run(move |pool| async move {
            let conn = pool.get().await?;
            let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
                .iter()
                .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
                .collect();
            let rows = conn.db()?.all(sql.as_str(), &refs).await?;
            rows.iter().map(&f).collect()
        })
    }
}

/// Walks the rows of a query with a server-side cursor, a page at a time, in one read-only
/// snapshot (REPEATABLE READ): for whole-table reads that must not hold every row in memory
/// and must see one consistent state.
struct Cursor<'a, T> {
    store: &'a PgStore,
    sql: String,
    decode: fn(&Row) -> Result<T, StoreError>,
    /// The connection holding the open transaction, between pages.
    conn: Option<Conn>,
    buf: std::collections::VecDeque<T>,
    done: bool,
}

impl<'a, T> Cursor<'a, T> {
    fn new(store: &'a PgStore, sql: String, decode: fn(&Row) -> Result<T, StoreError>) -> Self {
        Cursor {
            store,
            sql,
            decode,
            conn: None,
            buf: Default::default(),
            done: false,
        }
    }
}

impl<T: Send + 'static> Iterator for Cursor<'_, T> {
    type Item = Result<T, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() && !self.done {
            let conn = self.conn.take();
            let sql = self.sql.clone();
            let decode = self.decode;
            let page = self.store.run(move |pool| async move {
                let conn = match conn {
                    Some(c) => c,
                    None => {
                        let c = pool.get().await?;
                        let begin = format!(
                            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; DECLARE imprint_rows NO SCROLL CURSOR FOR {sql}"
                        );
                        if let Err(e) = c.client()?.batch_execute(&begin).await {
                            c.discard();
                            return Err(pg(e));
                        }
                        c
                    }
                };
                let fetch = format!("FETCH {PAGE} FROM imprint_rows");
                let rows = match conn.client()?.query(fetch.as_str(), &[]).await {
                    Ok(rows) => rows,
                    Err(e) => {
                        conn.discard();
                        return Err(pg(e));
                    }
                };
                let items = match rows.iter().map(decode).collect::<Result<Vec<T>, _>>() {
                    Ok(items) => items,
                    Err(e) => {
                        conn.discard();
                        return Err(e);
                    }
                };
                if (items.len() as i64) < PAGE {
                    // The end: finish the transaction; the connection goes back to the pool.
                    if let Err(e) = conn.client()?.batch_execute("COMMIT").await {
                        conn.discard();
                        return Err(pg(e));
                    }
                    return Ok((None, items));
                }
                Ok((Some(conn), items))
            });
            match page {
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
                Ok((conn, items)) => {
                    self.done = conn.is_none();
                    self.conn = conn;
                    self.buf.extend(items);
                }
            }
        }
        self.buf.pop_front().map(Ok)
    }
}

impl<T> Drop for Cursor<'_, T> {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            c.discard();
        }
    }
}

/// An index row: (key, serial or NULL, version or NULL).
fn index_entry(r: &Row) -> Result<IndexEntry, StoreError> {
    let key: Vec<u8> = r.try_get(0).map_err(pg)?;
    let serial: Option<i64> = r.try_get(1).map_err(pg)?;
    let version: Option<i64> = r.try_get(2).map_err(pg)?;
    Ok(IndexEntry {
        key,
        holder: serial.map(|s| (u(s), version.map_or(0, u))),
    })
}

impl Store for PgStore {
    fn shared(&self) -> bool {
        true
    }

    fn heartbeat(&self, instance: &str, node: &str, window: Duration) -> Result<u32, StoreError> {
        let (instance, node) = (instance.to_string(), node.to_string());
        let window_ms = window.as_millis() as f64;
        self.run(move |pool| async move {
            let conn = pool.get().await?;
            let db = conn.db()?;
            db.exec(
                "INSERT INTO nodes (instance, node, started, seen) VALUES ($1, $2, now(), now()) \
                 ON CONFLICT (instance) DO UPDATE SET seen = now()",
                &[&instance, &node],
            )
            .await?;
            db.exec(
                "DELETE FROM nodes WHERE seen < now() - interval '1 day'",
                &[],
            )
            .await?;
            let r = db
                .one(
                    "SELECT count(*) FROM nodes WHERE seen >= now() - make_interval(secs => $1::float8 / 1000)",
                    &[&window_ms],
                )
                .await?;
            let n: i64 = r.try_get(0).map_err(pg)?;
            Ok(u32::try_from(n.max(1)).unwrap_or(u32::MAX))
        })
    }

    fn next_crl_number(&self, at_least: u64) -> Result<u64, StoreError> {
        let floor = i(at_least);
        self.write(move |pool| async move {
            let conn = pool.get().await?;
            let r = conn
                .db()?
                .one(
                    "UPDATE crl_number SET number = greatest(number + 1, $1) WHERE id = 1 RETURNING number",
                    &[&floor],
                )
                .await?;
            Ok(u(r.try_get(0).map_err(pg)?))
        })
    }

    fn leave(&self, instance: &str) -> Result<(), StoreError> {
        let instance = instance.to_string();
        self.run(move |pool| async move {
            let conn = pool.get().await?;
            conn.db()?
                .exec("DELETE FROM nodes WHERE instance = $1", &[&instance])
                .await
                .map(|_| ())
        })
    }

    fn device(&self, serial: u64) -> Result<Option<DeviceRecord>, StoreError> {
        let sql = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE serial = $1");
        Ok(self.query_rows(sql, vec![i(serial)], device_of)?.pop())
    }

    fn serial_for_key(&self, key_hash: &[u8; 32]) -> Result<Option<u64>, StoreError> {
        let key = key_hash.to_vec();
        self.run(move |pool| async move {
            let conn = pool.get().await?;
            let r = conn
                .db()?
                .opt("SELECT serial FROM keys WHERE key_hash = $1", &[&key])
                .await?;
            r.map(|r| r.try_get::<_, i64>(0).map(u))
                .transpose()
                .map_err(pg)
        })
    }

    fn binding_of(
        &self,
        serial: u64,
        key_hash: &[u8; 32],
    ) -> Result<crate::store::BindingRead, StoreError> {
        let key = key_hash.to_vec();
        self.run(move |pool| async move {
            let conn = pool.get().await?;
            let r = conn.db()?.one(BINDING_OF, &[&i(serial), &key]).await?;
            let found: Option<i64> = r.try_get(0).map_err(pg)?;
            let holder: Option<i64> = r.try_get(8).map_err(pg)?;
            let resets: i64 = r.try_get(9).map_err(pg)?;
            match found {
                Some(_) => Ok(crate::store::BindingRead {
                    device: Some(device_of(&r)?),
                    ..Default::default()
                }),
                None => Ok(crate::store::BindingRead {
                    device: None,
                    key_holder: holder.map(u),
                    resets: u(resets),
                }),
            }
        })
    }

    fn fetch_read(
        &self,
        serial: u64,
        pool_spread: usize,
    ) -> Result<crate::store::FetchRead, StoreError> {
        self.run(move |pool| async move {
            let conn = pool.get().await?;
            let db = conn.db()?;
            let versions_sql = format!(
                "SELECT {SECRET_COLUMNS} FROM secret_versions WHERE serial = $1 ORDER BY version"
            );
            let device_sql = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE serial = $1");
            let pool_sql = format!(
                "SELECT {POOL_COLUMNS} FROM secret_pool ORDER BY key_id LIMIT {pool_spread}"
            );
            // Prepared first, so that the three leave in one flight, in this order (each its
            // own snapshot: the device's record is read after its versions).
            db.prepare(&[&versions_sql, &device_sql, &pool_sql]).await?;
            let s = i(serial);
            let by_serial: [P<'_>; 1] = [&s];
            let (versions, device, entries) = tokio::try_join!(
                db.all(&versions_sql, &by_serial),
                db.all(&device_sql, &by_serial),
                db.all(&pool_sql, &[]),
            )?;
            Ok(crate::store::FetchRead {
                versions: versions.iter().map(secret_of).collect::<Result<_, _>>()?,
                device: device.iter().map(device_of).next().transpose()?,
                pool: entries.iter().map(pool_of).collect::<Result<_, _>>()?,
            })
        })
    }

    fn resets(&self, serial: u64) -> Result<u64, StoreError> {
        let counts = self.query_rows(
            "SELECT count(*) FROM device_resets WHERE serial = $1".into(),
            vec![i(serial)],
            |r| Ok(u(r.try_get(0).map_err(pg)?)),
        )?;
        Ok(counts.into_iter().next().unwrap_or(0))
    }

    fn line(&self, id: &str) -> Result<Option<LineRecord>, StoreError> {
        let id = id.to_string();
        self.run(move |pool| async move {
            let conn = pool.get().await?;
            let sql = format!("SELECT {LINE_COLUMNS} FROM lines WHERE id = $1");
            let r = conn
                .client()?
                .query_opt(sql.as_str(), &[&id])
                .await
                .map_err(pg)?;
            r.as_ref().map(line_of).transpose()
        })
    }

    fn lines(&self) -> Result<Vec<LineRecord>, StoreError> {
        self.query_rows(
            format!("SELECT {LINE_COLUMNS} FROM lines ORDER BY id"),
            vec![],
            line_of,
        )
    }

    fn add_line(&self, line: &LineRecord, actor: &str) -> Result<(), StoreError> {
        let (line, actor) = (line.clone(), actor.to_string());
        self.write(move |pool| {
            let (line, actor) = (line.clone(), actor.clone());
            async move {
                let mut conn = pool.get().await?;
                let (tx, stmts) = conn.transaction_db().await?;
                let db = Db {
                    on: On::Tx(&tx),
                    stmts: &stmts,
                };
                let mut chain = lock_head(&db).await?;
                let lq = format!("SELECT {LINE_COLUMNS} FROM lines WHERE id = $1");
                let existing = tx
                    .query_opt(lq.as_str(), &[&line.id])
                    .await
                    .map_err(pg)?
                    .as_ref()
                    .map(line_of)
                    .transpose()?;
                let event = rules::add_line(existing.as_ref(), &line, &actor)
                    .map_err(StoreError::LineExists)?;
                tx.execute(
                    "INSERT INTO lines (id, public_key, first_serial, last_serial, quota, rate, enrolled, active, created_at, secret_source) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                    &[
                        &line.id,
                        &line.public_key,
                        &i(line.first_serial),
                        &i(line.last_serial),
                        &i(line.quota),
                        &i32::try_from(line.rate).unwrap_or(i32::MAX),
                        &i(line.enrolled),
                        &line.active,
                        &i(line.created_at),
                        &line.secret_source.to_string(),
                    ],
                )
                .await
                .map_err(pg)?;
                append(&db, &mut chain, &event, pool.audit_key.get()).await?;
                set_head(&db, &chain).await?;
                tx.commit().await.map_err(pg)
            }
        })
    }

    fn add_bdk(&self, bdk: &BdkRecord, actor: &str) -> Result<(), StoreError> {
        let (bdk, actor) = (bdk.clone(), actor.to_string());
        self.write(move |pool| {
            let (bdk, actor) = (bdk.clone(), actor.clone());
            async move {
                let mut conn = pool.get().await?;
                let (tx, stmts) = conn.transaction_db().await?;
                let db = Db {
                    on: On::Tx(&tx),
                    stmts: &stmts,
                };
                let mut chain = lock_head(&db).await?;
                let q = format!("SELECT {BDK_COLUMNS} FROM dukpt_bdks WHERE id = $1");
                let existing = tx
                    .query_opt(q.as_str(), &[&bdk.id])
                    .await
                    .map_err(pg)?
                    .as_ref()
                    .map(bdk_of)
                    .transpose()?;
                let event = rules::add_bdk(existing.as_ref(), &bdk, &actor)
                    .map_err(StoreError::BdkExists)?;
                // The primary key refuses a concurrent addition of the same id (a unique
                // violation: this transaction rolls back and the retry sees the row).
                let (ciphertext, nonce) = bdk_sealed(&bdk);
                tx.execute(
                    "INSERT INTO dukpt_bdks (id, algorithm, ciphertext, nonce, kcv, created_at, token_object) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    &[
                        &bdk.id,
                        &bdk.algorithm,
                        &ciphertext,
                        &nonce,
                        &bdk.kcv,
                        &i(bdk.created_at),
                        &bdk.token_object,
                    ],
                )
                .await
                .map_err(pg)?;
                append(&db, &mut chain, &event, pool.audit_key.get()).await?;
                set_head(&db, &chain).await?;
                tx.commit().await.map_err(pg)
            }
        })
    }

    fn bdks(&self) -> Result<Vec<BdkRecord>, StoreError> {
        self.query_rows(
            format!("SELECT {BDK_COLUMNS} FROM dukpt_bdks ORDER BY id"),
            vec![],
            bdk_of,
        )
    }

    fn dukpt_next(&self, bdk_id: &str) -> Result<u64, StoreError> {
        let id = bdk_id.to_string();
        self.run(move |pool| async move {
            let conn = pool.get().await?;
            let rows = conn
                .db()?
                .all(
                    "SELECT next_derivation FROM dukpt_bdks WHERE id = $1",
                    &[&id],
                )
                .await?;
            match rows.first() {
                Some(r) => Ok(u(r.try_get(0).map_err(pg)?)),
                None => Ok(0),
            }
        })
    }

    fn apply_writes(&self, writes: &[Write]) -> Result<Vec<Written>, StoreError> {
        let writes = Arc::new(writes.to_vec());
        if writes.len() == 1 {
            return self.write(move |pool| batch::apply(pool, writes.clone()));
        }
        // A batch that meets another writer is not retried whole: the caller (the group
        // commit) applies its writes one by one, each retried alone.
        self.run(move |pool| batch::apply(pool, writes))
    }

    fn sync(&self) -> Result<(), StoreError> {
        // Every write committed in its own transaction, durable (synchronous_commit = on) when
        // the commit returned.
        Ok(())
    }

    fn secret_versions(&self, serial: u64) -> Result<Vec<SecretRecord>, StoreError> {
        self.query_rows(
            format!(
                "SELECT {SECRET_COLUMNS} FROM secret_versions WHERE serial = $1 ORDER BY version"
            ),
            vec![i(serial)],
            secret_of,
        )
    }

    fn pool(&self, skip: usize, n: usize) -> Result<Vec<PoolEntry>, StoreError> {
        if skip == 0 {
            // The secret fetch's read (a constant `n`): with the limit a parameter, PostgreSQL
            // planned the statement again on every call (pg_stat_statements: 10,006 plans for
            // 10,000 calls); with it written in, the statement is planned once per connection.
            return self.query_rows(
                format!("SELECT {POOL_COLUMNS} FROM secret_pool ORDER BY key_id LIMIT {n}"),
                vec![],
                pool_of,
            );
        }
        self.query_rows(
            format!("SELECT {POOL_COLUMNS} FROM secret_pool ORDER BY key_id OFFSET $1 LIMIT $2"),
            vec![skip as i64, n as i64],
            pool_of,
        )
    }

    fn set_status(
        &self,
        serial: u64,
        status: DeviceStatus,
        at: u64,
        actor: &str,
    ) -> Result<Option<DeviceRecord>, StoreError> {
        let actor = actor.to_string();
        self.write(move |pool| {
            let actor = actor.clone();
            async move {
                let mut conn = pool.get().await?;
                let (tx, stmts) = conn.transaction_db().await?;
                let db = Db {
                    on: On::Tx(&tx),
                    stmts: &stmts,
                };
                let mut chain = lock_head(&db).await?;
                let dq =
                    format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE serial = $1 FOR UPDATE");
                let rec = tx
                    .query_opt(dq.as_str(), &[&i(serial)])
                    .await
                    .map_err(pg)?
                    .as_ref()
                    .map(device_of)
                    .transpose()?;
                let Some((rec, event)) = rules::set_status(rec.as_ref(), status, at, &actor) else {
                    return Ok(None);
                };
                if let Some(event) = event {
                    tx.execute(
                        "UPDATE devices SET status = $2, revoked_at = $3 WHERE serial = $1",
                        &[&i(serial), &status_name(rec.status), &oi(rec.revoked_at)],
                    )
                    .await
                    .map_err(pg)?;
                    append(&db, &mut chain, &event, pool.audit_key.get()).await?;
                    set_head(&db, &chain).await?;
                }
                tx.commit().await.map_err(pg)?;
                Ok(Some(rec))
            }
        })
    }

    fn reset_device(&self, serial: u64, at: u64, actor: &str) -> Result<ResetOutcome, StoreError> {
        let actor = actor.to_string();
        self.write(move |pool| {
            let actor = actor.clone();
            async move {
                let mut conn = pool.get().await?;
                let (tx, stmts) = conn.transaction_db().await?;
                let db = Db {
                    on: On::Tx(&tx),
                    stmts: &stmts,
                };
                let mut chain = lock_head(&db).await?;
                let dq = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE serial = $1 FOR UPDATE");
                let rec = tx
                    .query_opt(dq.as_str(), &[&i(serial)])
                    .await
                    .map_err(pg)?
                    .as_ref()
                    .map(device_of)
                    .transpose()?;
                let (line, versions) = match &rec {
                    None => (None, Vec::new()),
                    Some(r) => {
                        let lq = format!("SELECT {LINE_COLUMNS} FROM lines WHERE id = $1");
                        let sq = format!(
                            "SELECT {SECRET_COLUMNS} FROM secret_versions WHERE serial = $1 ORDER BY version"
                        );
                        let s = i(serial);
                        let p_line: [P<'_>; 1] = [&r.line];
                        let p_serial: [P<'_>; 1] = [&s];
                        let (line, versions) = tokio::try_join!(
                            tx.query_opt(lq.as_str(), &p_line),
                            tx.query(sq.as_str(), &p_serial),
                        )
                        .map_err(pg)?;
                        (
                            line.as_ref().map(line_of).transpose()?,
                            versions.iter().map(secret_of).collect::<Result<Vec<_>, _>>()?,
                        )
                    }
                };
                let (outcome, writes) =
                    rules::reset(rec.as_ref(), line.as_ref(), &versions, at, &actor);
                let Some(w) = writes else {
                    return Ok(outcome);
                };
                let entry = append(&db, &mut chain, &w.event, pool.audit_key.get()).await?;
                let old = &w.history.device;
                tx.execute("DELETE FROM devices WHERE serial = $1", &[&i(serial)])
                    .await
                    .map_err(pg)?;
                if w.line.is_some() {
                    tx.execute(
                        "UPDATE lines SET enrolled = enrolled - 1 WHERE id = $1 AND enrolled > 0",
                        &[&old.line],
                    )
                    .await
                    .map_err(pg)?;
                }
                tx.execute(
                    "INSERT INTO device_resets (serial, seq, spki, certificate, line, token_id, enrolled_at, reset_at, actor) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    &[
                        &i(serial),
                        &i(entry.seq),
                        &old.spki,
                        &old.certificate,
                        &old.line,
                        &old.token_id,
                        &i(old.enrolled_at),
                        &i(w.history.reset_at),
                        &w.history.actor,
                    ],
                )
                .await
                .map_err(pg)?;
                tx.execute(
                    "UPDATE secret_versions SET retired_at = $2 WHERE serial = $1 AND retired_at IS NULL",
                    &[&i(serial), &i(at)],
                )
                .await
                .map_err(pg)?;
                set_head(&db, &chain).await?;
                tx.commit().await.map_err(pg)?;
                Ok(outcome)
            }
        })
    }

    fn history(&self, serial: u64) -> Result<Vec<ResetRecord>, StoreError> {
        self.query_rows(
            "SELECT serial, spki, certificate, line, token_id, enrolled_at, reset_at, actor FROM device_resets WHERE serial = $1 ORDER BY seq".into(),
            vec![i(serial)],
            |r| {
                Ok(ResetRecord {
                    device: DeviceRecord {
                        serial: u(r.try_get(0).map_err(pg)?),
                        spki: r.try_get(1).map_err(pg)?,
                        certificate: r.try_get(2).map_err(pg)?,
                        line: r.try_get(3).map_err(pg)?,
                        token_id: r.try_get(4).map_err(pg)?,
                        enrolled_at: u(r.try_get(5).map_err(pg)?),
                        status: DeviceStatus::Active,
                        revoked_at: None,
                    },
                    reset_at: u(r.try_get(6).map_err(pg)?),
                    actor: r.try_get(7).map_err(pg)?,
                })
            },
        )
    }

    fn revoked(&self) -> Result<Vec<RevokedCert>, StoreError> {
        // The generation is read from each certificate (SPEC.md 5), so that one issued before
        // generations existed is listed by the serial it carries.
        let cert = |serial: i64, certificate: Vec<u8>, at: i64| RevokedCert {
            serial: u(serial),
            generation: crate::records::generation_of(&certificate),
            at: u(at),
            superseded: false,
        };
        let mut out = self.query_rows(
            "SELECT serial, certificate, revoked_at FROM devices WHERE status = 'revoked'".into(),
            vec![],
            move |r| {
                let at: Option<i64> = r.try_get(2).map_err(pg)?;
                Ok(cert(
                    r.try_get(0).map_err(pg)?,
                    r.try_get(1).map_err(pg)?,
                    at.unwrap_or(0),
                ))
            },
        )?;
        let superseded = self.query_rows(
            "SELECT r.serial, r.certificate, r.reset_at, d.certificate FROM device_resets r LEFT JOIN devices d ON d.serial = r.serial".into(),
            vec![],
            move |r| {
                let old = RevokedCert {
                    superseded: true,
                    ..cert(
                        r.try_get(0).map_err(pg)?,
                        r.try_get(1).map_err(pg)?,
                        r.try_get(2).map_err(pg)?,
                    )
                };
                let current: Option<Vec<u8>> = r.try_get(3).map_err(pg)?;
                // A binding reset before generations existed has the serial its successor
                // carries: listing it would refuse the current certificate too.
                Ok(current
                    .is_none_or(|c| crate::records::generation_of(&c) != old.generation)
                    .then_some(old))
            },
        )?;
        out.extend(superseded.into_iter().flatten());
        out.sort();
        Ok(out)
    }

    fn revoke_operator(
        &self,
        name: &str,
        at: u64,
        actor: &str,
    ) -> Result<OperatorRevocation, StoreError> {
        let (name, actor) = (name.to_string(), actor.to_string());
        self.write(move |pool| {
            let (name, actor) = (name.clone(), actor.clone());
            async move {
                let mut conn = pool.get().await?;
                let (tx, stmts) = conn.transaction_db().await?;
                let db = Db {
                    on: On::Tx(&tx),
                    stmts: &stmts,
                };
                let mut chain = lock_head(&db).await?;
                let existing = tx
                    .query_opt(
                        "SELECT name, revoked_at, actor FROM operator_revocations WHERE name = $1",
                        &[&name],
                    )
                    .await
                    .map_err(pg)?
                    .as_ref()
                    .map(operator_revocation_of)
                    .transpose()?;
                let (rec, event) = rules::revoke_operator(existing.as_ref(), &name, at, &actor);
                if let Some(event) = event {
                    tx.execute(
                        "INSERT INTO operator_revocations (name, revoked_at, actor) VALUES ($1, $2, $3)",
                        &[&rec.name, &i(rec.revoked_at), &rec.actor],
                    )
                    .await
                    .map_err(pg)?;
                    append(&db, &mut chain, &event, pool.audit_key.get()).await?;
                    set_head(&db, &chain).await?;
                }
                tx.commit().await.map_err(pg)?;
                Ok(rec)
            }
        })
    }

    fn operator_revocation(&self, name: &str) -> Result<Option<OperatorRevocation>, StoreError> {
        let name = name.to_string();
        self.run(move |pool| async move {
            let conn = pool.get().await?;
            let r = conn
                .client()?
                .query_opt(
                    "SELECT name, revoked_at, actor FROM operator_revocations WHERE name = $1",
                    &[&name],
                )
                .await
                .map_err(pg)?;
            r.as_ref().map(operator_revocation_of).transpose()
        })
    }

    fn operator_revocations(&self) -> Result<Vec<OperatorRevocation>, StoreError> {
        self.query_rows(
            "SELECT name, revoked_at, actor FROM operator_revocations ORDER BY name".into(),
            vec![],
            operator_revocation_of,
        )
    }

    fn change_line(
        &self,
        id: &str,
        change: super::LineChange,
        at: u64,
        actor: &str,
    ) -> Result<Option<LineRecord>, StoreError> {
        let (id, actor) = (id.to_string(), actor.to_string());
        self.write(move |pool| {
            let (id, actor) = (id.clone(), actor.clone());
            async move {
                let mut conn = pool.get().await?;
                let (tx, stmts) = conn.transaction_db().await?;
                let db = Db {
                    on: On::Tx(&tx),
                    stmts: &stmts,
                };
                let mut chain = lock_head(&db).await?;
                let lq = format!("SELECT {LINE_COLUMNS} FROM lines WHERE id = $1 FOR UPDATE");
                let line = tx
                    .query_opt(lq.as_str(), &[&id])
                    .await
                    .map_err(pg)?
                    .as_ref()
                    .map(line_of)
                    .transpose()?;
                let Some((line, event)) = rules::change_line(line.as_ref(), change, at, &actor)
                else {
                    return Ok(None);
                };
                if let Some(event) = event {
                    let rate = i32::try_from(line.rate).map_err(|_| {
                        StoreError::Backend(format!("rate {} out of range", line.rate))
                    })?;
                    tx.execute(
                        "UPDATE lines SET active = $2, rate = $3 WHERE id = $1",
                        &[&id, &line.active, &rate],
                    )
                    .await
                    .map_err(pg)?;
                    append(&db, &mut chain, &event, pool.audit_key.get()).await?;
                    set_head(&db, &chain).await?;
                }
                tx.commit().await.map_err(pg)?;
                Ok(Some(line))
            }
        })
    }

    fn record_event(
        &self,
        event: &str,
        serial: Option<u64>,
        actor: &str,
        detail: String,
        at: u64,
    ) -> Result<(), StoreError> {
        let ev = AuditEvent {
            at,
            event: event.to_string(),
            serial,
            actor: actor.to_string(),
            detail,
        };
        self.write(move |pool| {
            let ev = ev.clone();
            async move {
                let mut conn = pool.get().await?;
                let (tx, stmts) = conn.transaction_db().await?;
                let db = Db {
                    on: On::Tx(&tx),
                    stmts: &stmts,
                };
                let mut chain = lock_head(&db).await?;
                append(&db, &mut chain, &ev, pool.audit_key.get()).await?;
                set_head(&db, &chain).await?;
                tx.commit().await.map_err(pg)
            }
        })
    }

    fn set_audit_key(&self, key: AuditKey) {
        let _ = self.pool.audit_key.set(key);
    }

    fn last_audit(&self) -> Result<Option<AuditEntry>, StoreError> {
        let sql = format!("SELECT {AUDIT_COLUMNS} FROM audit ORDER BY seq DESC LIMIT 1");
        let rows = self.query_rows(sql, Vec::new(), audit_of)?;
        Ok(rows.into_iter().next())
    }

    fn audit_raw(&self, after: u64) -> Box<dyn Iterator<Item = Result<RawAudit, StoreError>> + '_> {
        // The entry as stored, in the CBOR form the sled store keeps, so that one verifier
        // reads both: a changed column changes the bytes and fails the entry's own hash.
        Box::new(self.audit_from(after).map(|r| {
            r.map(|e| {
                let key = e.seq.to_be_bytes().to_vec();
                (key, to_cbor(&e))
            })
        }))
    }

    fn devices(&self) -> Box<dyn Iterator<Item = Result<DeviceRecord, StoreError>> + '_> {
        Box::new(Cursor::new(
            self,
            format!("SELECT {DEVICE_COLUMNS} FROM devices ORDER BY serial"),
            device_of,
        ))
    }

    fn secrets(&self) -> Box<dyn Iterator<Item = Result<SecretRecord, StoreError>> + '_> {
        Box::new(Cursor::new(
            self,
            format!("SELECT {SECRET_COLUMNS} FROM secret_versions ORDER BY serial, version"),
            secret_of,
        ))
    }

    fn index(&self, index: Index) -> Box<dyn Iterator<Item = Result<IndexEntry, StoreError>> + '_> {
        let sql = match index {
            Index::Keys => "SELECT key_hash, serial, NULL::bigint FROM keys",
            // The same bytes as token_index_key: line, a zero byte, token id.
            Index::Tokens => {
                "SELECT convert_to(line, 'UTF8') || '\\x00'::bytea || token_id, serial, NULL::bigint FROM tokens"
            }
            Index::SecretTags => "SELECT index_tag, serial, version FROM secret_keys",
            Index::KeyIds => "SELECT convert_to(key_id, 'UTF8'), serial, version FROM secret_keys",
        };
        Box::new(Cursor::new(self, sql.to_string(), index_entry))
    }

    fn audit(&self) -> Box<dyn Iterator<Item = Result<AuditEntry, StoreError>> + '_> {
        Box::new(self.audit_from(0))
    }

    fn raw_records(&self) -> Result<Vec<RawRecord>, StoreError> {
        // Every row of every table of the schema as JSON text, by table name and row: for
        // before/after comparisons. The tables come from the catalog, so that one added later
        // is compared too; all but `nodes`, where each running node writes its heartbeat (a
        // sign of life, no record).
        self.run(|pool| async move {
            let conn = pool.get().await?;
            let c = conn.client()?;
            let tables = c
                .query(
                    "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = current_schema() AND c.relkind = 'r' AND c.relname <> 'nodes' \
                     ORDER BY 1",
                    &[],
                )
                .await
                .map_err(pg)?;
            let mut out = Vec::new();
            for t in tables {
                let table: String = t.try_get(0).map_err(pg)?;
                let sql = format!(
                    "SELECT row_to_json(t)::text FROM \"{}\" t ORDER BY 1",
                    table.replace('"', "\"\"")
                );
                for r in c.query(sql.as_str(), &[]).await.map_err(pg)? {
                    let row: String = r.try_get(0).map_err(pg)?;
                    out.push((table.clone(), Vec::new(), row.into_bytes()));
                }
            }
            Ok(out)
        })
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.run(|pool| async move {
            let conn = pool.get().await?;
            let r = conn
                .client()?
                .query_one(
                    "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = current_schema() AND c.relkind = 'r'",
                    &[],
                )
                .await
                .map_err(pg)?;
            Ok(u(r.try_get(0).map_err(pg)?))
        })
    }
}

/// Loads records copied from another store into an empty schema ([`PgStore::importer`]), a
/// few thousand rows per statement, in the order the tables' references need.
pub struct Importer<'a> {
    store: &'a PgStore,
    buf: Vec<super::Exported>,
    last_audit: Option<(u64, [u8; 32])>,
    /// Rows loaded.
    pub rows: u64,
}

impl std::fmt::Debug for Importer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Importer")
            .field("rows", &self.rows)
            .finish()
    }
}

const IMPORT_CHUNK: usize = 2000;

impl PgStore {
    /// Rows in one of the store's tables.
    pub fn row_count(&self, table: &'static str) -> Result<u64, StoreError> {
        if !TABLES.iter().any(|(t, _)| *t == table) {
            return Err(StoreError::Backend(format!("no table {table}")));
        }
        self.run(move |pool| async move {
            let conn = pool.get().await?;
            let r = conn
                .client()?
                .query_one(format!("SELECT count(*) FROM {table}").as_str(), &[])
                .await
                .map_err(pg)?;
            Ok(u(r.try_get(0).map_err(pg)?))
        })
    }

    /// An importer into this store, which must hold no record yet.
    pub fn importer(&self) -> Result<Importer<'_>, StoreError> {
        let empty = self.run(|pool| async move {
            let conn = pool.get().await?;
            let r = conn
                .client()?
                .query_one(
                    "SELECT (SELECT count(*) FROM lines) + (SELECT count(*) FROM audit)",
                    &[],
                )
                .await
                .map_err(pg)?;
            Ok(r.try_get::<_, i64>(0).map_err(pg)? == 0)
        })?;
        if !empty {
            return Err(StoreError::Backend(format!(
                "the schema at {} already holds records; copy into an empty one",
                self.target
            )));
        }
        Ok(Importer {
            store: self,
            buf: Vec::new(),
            last_audit: None,
            rows: 0,
        })
    }
}

fn kind(e: &super::Exported) -> u8 {
    use super::Exported as X;
    match e {
        X::Line(_) => 0,
        X::Device(_) => 1,
        X::Key { .. } => 2,
        X::Token { .. } => 3,
        X::Version(_) => 4,
        X::Pool(_) => 5,
        X::Reset { .. } => 6,
        X::Audit(_) => 7,
        X::Operator(_) => 8,
        X::Bdk { .. } => 9,
    }
}

impl Importer<'_> {
    /// Adds one record (records of one kind arrive together, kinds in export order).
    pub fn push(&mut self, e: super::Exported) -> Result<(), StoreError> {
        if let super::Exported::Audit(a) = &e {
            self.last_audit = Some((a.seq, a.compute_hash()));
        }
        if self.buf.first().is_some_and(|f| kind(f) != kind(&e)) || self.buf.len() >= IMPORT_CHUNK {
            self.flush()?;
        }
        self.buf.push(e);
        Ok(())
    }

    /// Loads what is buffered and sets the audit head to the last entry loaded.
    pub fn finish(mut self) -> Result<u64, StoreError> {
        self.flush()?;
        if let Some((seq, hash)) = self.last_audit {
            self.store.run(move |pool| async move {
                let conn = pool.get().await?;
                conn.client()?
                    .execute(
                        "UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1",
                        &[&i(seq), &hash.as_slice()],
                    )
                    .await
                    .map_err(pg)?;
                Ok(())
            })?;
        }
        Ok(self.rows)
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.buf);
        self.rows += batch.len() as u64;
        self.store.run(move |pool| async move {
            let mut conn = pool.get().await?;
            let tx = conn.transaction().await?;
            load(&tx, batch).await?;
            tx.commit().await.map_err(pg)
        })
    }
}

/// Inserts one batch of records of one kind.
async fn load(tx: &Transaction<'_>, batch: Vec<super::Exported>) -> Result<(), StoreError> {
    use super::Exported as X;
    macro_rules! col {
        ($batch:expr, $pat:pat => $val:expr) => {
            $batch
                .iter()
                .filter_map(|e| match e {
                    $pat => Some($val),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
    }
    let exec = |sql: &'static str,
                params: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>>| async move {
        let refs: Vec<P<'_>> = params.iter().map(|p| p.as_ref() as P<'_>).collect();
        tx.execute(sql, &refs).await.map_err(pg)
    };
    type B = Box<dyn tokio_postgres::types::ToSql + Sync + Send>;
    match batch.first().map(kind) {
        Some(0) => {
            exec(
                "INSERT INTO lines (id, public_key, first_serial, last_serial, quota, rate, enrolled, active, created_at, secret_source) SELECT * FROM unnest($1::text[], $2::bytea[], $3::bigint[], $4::bigint[], $5::bigint[], $6::int[], $7::bigint[], $8::bool[], $9::bigint[], $10::text[])",
                vec![
                    Box::new(col!(batch, X::Line(l) => l.id.clone())) as B,
                    Box::new(col!(batch, X::Line(l) => l.public_key.clone())),
                    Box::new(col!(batch, X::Line(l) => i(l.first_serial))),
                    Box::new(col!(batch, X::Line(l) => i(l.last_serial))),
                    Box::new(col!(batch, X::Line(l) => i(l.quota))),
                    Box::new(col!(batch, X::Line(l) => i32::try_from(l.rate).unwrap_or(i32::MAX))),
                    Box::new(col!(batch, X::Line(l) => i(l.enrolled))),
                    Box::new(col!(batch, X::Line(l) => l.active)),
                    Box::new(col!(batch, X::Line(l) => i(l.created_at))),
                    Box::new(col!(batch, X::Line(l) => l.secret_source.to_string())),
                ],
            )
            .await?;
        }
        Some(1) => {
            exec(
                batch::INSERT_DEVICES,
                vec![
                    Box::new(col!(batch, X::Device(d) => i(d.serial))) as B,
                    Box::new(col!(batch, X::Device(d) => d.spki.clone())),
                    Box::new(
                        col!(batch, X::Device(d) => protocol_spec::spki::sha256(&d.spki).to_vec()),
                    ),
                    Box::new(col!(batch, X::Device(d) => d.certificate.clone())),
                    Box::new(col!(batch, X::Device(d) => d.line.clone())),
                    Box::new(col!(batch, X::Device(d) => d.token_id.clone())),
                    Box::new(col!(batch, X::Device(d) => i(d.enrolled_at))),
                    Box::new(col!(batch, X::Device(d) => status_name(d.status).to_string())),
                    Box::new(col!(batch, X::Device(d) => oi(d.revoked_at))),
                ],
            )
            .await?;
        }
        Some(2) => {
            exec(
                batch::INSERT_KEYS,
                vec![
                    Box::new(col!(batch, X::Key { hash, .. } => hash.to_vec())) as B,
                    Box::new(col!(batch, X::Key { serial, .. } => i(*serial))),
                ],
            )
            .await?;
        }
        Some(3) => {
            exec(
                batch::INSERT_TOKENS,
                vec![
                    Box::new(col!(batch, X::Token { line, .. } => line.clone())) as B,
                    Box::new(col!(batch, X::Token { token_id, .. } => token_id.clone())),
                    Box::new(col!(batch, X::Token { serial, .. } => i(*serial))),
                ],
            )
            .await?;
        }
        Some(4) => {
            exec(
                batch::INSERT_SECRET_KEYS,
                vec![
                    Box::new(col!(batch, X::Version(v) => v.index_tag.clone())) as B,
                    Box::new(col!(batch, X::Version(v) => v.key_id.clone())),
                    Box::new(col!(batch, X::Version(v) => i(v.serial))),
                    Box::new(col!(batch, X::Version(v) => i(v.version))),
                ],
            )
            .await?;
            exec(
                batch::INSERT_VERSIONS,
                vec![
                    Box::new(col!(batch, X::Version(v) => i(v.serial))) as B,
                    Box::new(col!(batch, X::Version(v) => i(v.version))),
                    Box::new(col!(batch, X::Version(v) => v.key_id.clone())),
                    Box::new(col!(batch, X::Version(v) => v.ciphertext.clone())),
                    Box::new(col!(batch, X::Version(v) => v.nonce.clone())),
                    Box::new(col!(batch, X::Version(v) => v.kcv.clone())),
                    Box::new(col!(batch, X::Version(v) => v.index_tag.clone())),
                    Box::new(col!(batch, X::Version(v) => v.source.clone())),
                    Box::new(col!(batch, X::Version(v) => i(v.created_at))),
                    Box::new(col!(batch, X::Version(v) => oi(v.delivered_at))),
                    Box::new(col!(batch, X::Version(v) => oi(v.confirmed_at))),
                    Box::new(col!(batch, X::Version(v) => oi(v.retired_at))),
                ],
            )
            .await?;
        }
        Some(5) => {
            exec(
                "INSERT INTO secret_keys (index_tag, key_id, serial, version) SELECT t, k, NULL, NULL FROM unnest($1::bytea[], $2::text[]) AS u(t, k)",
                vec![
                    Box::new(col!(batch, X::Pool(p) => p.index_tag.clone())) as B,
                    Box::new(col!(batch, X::Pool(p) => p.key_id.clone())),
                ],
            )
            .await?;
            exec(
                batch::INSERT_POOL,
                vec![
                    Box::new(col!(batch, X::Pool(p) => p.key_id.clone())) as B,
                    Box::new(col!(batch, X::Pool(p) => p.ciphertext.clone())),
                    Box::new(col!(batch, X::Pool(p) => p.nonce.clone())),
                    Box::new(col!(batch, X::Pool(p) => p.kcv.clone())),
                    Box::new(col!(batch, X::Pool(p) => p.index_tag.clone())),
                    Box::new(col!(batch, X::Pool(p) => i(p.imported_at))),
                ],
            )
            .await?;
        }
        Some(6) => {
            exec(
                "INSERT INTO device_resets (serial, seq, spki, certificate, line, token_id, enrolled_at, reset_at, actor) SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bytea[], $4::bytea[], $5::text[], $6::bytea[], $7::bigint[], $8::bigint[], $9::text[])",
                vec![
                    Box::new(col!(batch, X::Reset { record, .. } => i(record.device.serial))) as B,
                    Box::new(col!(batch, X::Reset { seq, .. } => i(*seq))),
                    Box::new(col!(batch, X::Reset { record, .. } => record.device.spki.clone())),
                    Box::new(col!(batch, X::Reset { record, .. } => record.device.certificate.clone())),
                    Box::new(col!(batch, X::Reset { record, .. } => record.device.line.clone())),
                    Box::new(col!(batch, X::Reset { record, .. } => record.device.token_id.clone())),
                    Box::new(col!(batch, X::Reset { record, .. } => i(record.device.enrolled_at))),
                    Box::new(col!(batch, X::Reset { record, .. } => i(record.reset_at))),
                    Box::new(col!(batch, X::Reset { record, .. } => record.actor.clone())),
                ],
            )
            .await?;
        }
        Some(9) => {
            exec(
                "INSERT INTO dukpt_bdks (id, algorithm, ciphertext, nonce, kcv, created_at, next_derivation, token_object) SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::bytea[], $5::bytea[], $6::bigint[], $7::bigint[], $8::text[])",
                vec![
                    Box::new(col!(batch, X::Bdk { record: b, .. } => b.id.clone())) as B,
                    Box::new(col!(batch, X::Bdk { record: b, .. } => b.algorithm.clone())),
                    Box::new(col!(batch, X::Bdk { record: b, .. } => bdk_sealed(b).0)),
                    Box::new(col!(batch, X::Bdk { record: b, .. } => bdk_sealed(b).1)),
                    Box::new(col!(batch, X::Bdk { record: b, .. } => b.kcv.clone())),
                    Box::new(col!(batch, X::Bdk { record: b, .. } => i(b.created_at))),
                    Box::new(col!(batch, X::Bdk { next, .. } => i(*next))),
                    Box::new(col!(batch, X::Bdk { record: b, .. } => b.token_object.clone())),
                ],
            )
            .await?;
        }
        Some(7) => {
            exec(
                batch::INSERT_AUDITS,
                vec![
                    Box::new(col!(batch, X::Audit(a) => i(a.seq))) as B,
                    Box::new(col!(batch, X::Audit(a) => i(a.at))),
                    Box::new(col!(batch, X::Audit(a) => a.event.clone())),
                    Box::new(col!(batch, X::Audit(a) => oi(a.serial))),
                    Box::new(col!(batch, X::Audit(a) => a.actor.clone())),
                    Box::new(col!(batch, X::Audit(a) => a.detail.clone())),
                    Box::new(col!(batch, X::Audit(a) => a.prev_hash.clone())),
                    Box::new(col!(batch, X::Audit(a) => a.hash.clone())),
                    Box::new(col!(batch, X::Audit(a) => a.node.clone())),
                    Box::new(col!(batch, X::Audit(a) => a.mac.clone())),
                ],
            )
            .await?;
        }
        Some(8) => {
            exec(
                "INSERT INTO operator_revocations (name, revoked_at, actor) SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[])",
                vec![
                    Box::new(col!(batch, X::Operator(o) => o.name.clone())) as B,
                    Box::new(col!(batch, X::Operator(o) => i(o.revoked_at))),
                    Box::new(col!(batch, X::Operator(o) => o.actor.clone())),
                ],
            )
            .await?;
        }
        _ => {}
    }
    Ok(())
}

const AUDIT_COLUMNS: &str = "seq, at, event, serial, actor, detail, prev_hash, hash, node, mac";

impl PgStore {
    fn audit_from(&self, after: u64) -> Cursor<'_, AuditEntry> {
        Cursor::new(
            self,
            format!(
                "SELECT {AUDIT_COLUMNS} FROM audit WHERE seq > {} ORDER BY seq",
                i(after)
            ),
            audit_of,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ra::rules::SecretOp;
    use std::collections::HashMap;

    /// The database's silence counts from the latest answer or from when the first waiting call
    /// began, whichever is later: a burst after an idle spell (the latest answer 5 s ago) is
    /// waited for, not refused; the same calls still waiting a second later are.
    #[test]
    fn a_burst_after_an_idle_spell_is_waited_for() {
        let mut waits = Waits::new();
        waits.epoch = Instant::now()
            .checked_sub(Duration::from_secs(5))
            .unwrap_or_else(Instant::now);
        let slow: Vec<_> = (0..SLOW_CALLS_MAX).map(|_| SlowCall::new(&waits)).collect();
        assert_eq!(waits.refusal(), None);
        std::thread::sleep(STALLED + Duration::from_millis(50));
        assert!(
            waits
                .refusal()
                .is_some_and(|why| why.contains("answered nothing")),
            "{:?}",
            waits.refusal()
        );
        drop(slow);
        assert_eq!(waits.refusal(), None);
    }

    #[test]
    fn a_password_never_shows_in_the_target() {
        assert_eq!(
            redact("postgresql://imprint:hunter2@db.example:5432/ca"),
            "postgresql://imprint@db.example:5432/ca"
        );
        assert_eq!(
            redact("postgresql://imprint@db.example/ca"),
            "postgresql://imprint@db.example/ca"
        );
        let c = PgConfig {
            url: "postgresql://imprint:hunter2@127.0.0.1/ca".into(),
            password: None,
            ca_file: None,
            schema: "imprint".into(),
        };
        let e = c.driver_config().unwrap_err().to_string();
        assert!(
            e.contains("must not carry a password") && !e.contains("hunter2"),
            "{e}"
        );
    }

    #[test]
    fn schema_names_are_plain_identifiers() {
        for ok in ["imprint", "t_1", "a"] {
            assert!(check_schema_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "1a", "Imprint", "a;drop", "a b", &"x".repeat(64)] {
            assert!(check_schema_name(bad).is_err(), "{bad}");
        }
    }

    /// A store in a new schema of the test database, dropped with it (`.ci/run` starts the
    /// database; so does `eval "$(ca-server/scripts/test-postgres.sh start)"`).
    struct TestDb(PgStore, PgConfig);

    impl TestDb {
        #[allow(clippy::unwrap_used, clippy::panic)]
        fn new() -> Self {
            let need = |v: &str| {
                std::env::var(v).unwrap_or_else(|_| {
                    panic!(
                        "this test needs PostgreSQL: set IMPRINT_TEST_PG_URL, IMPRINT_TEST_PG_CA and IMPRINT_STORE_PASSWORD, e.g. with `eval \"$(ca-server/scripts/test-postgres.sh start)\"` (.ci/run does)"
                    )
                })
            };
            let mut tag = [0u8; 8];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut tag).unwrap();
            let config = PgConfig {
                url: need("IMPRINT_TEST_PG_URL"),
                password: Some(Zeroizing::new(need("IMPRINT_STORE_PASSWORD"))),
                ca_file: Some(need("IMPRINT_TEST_PG_CA").into()),
                schema: format!("t_{}", hex::encode(tag)),
            };
            PgStore::migrate(&config).unwrap();
            TestDb(PgStore::open(&config).unwrap(), config)
        }
    }

    impl Drop for TestDb {
        fn drop(&mut self) {
            let _ = PgStore::drop_schema(&self.1);
        }
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn crl_numbers_only_grow_across_nodes_and_restarts() {
        let db = TestDb::new();
        crate::store::test_support::crl_numbers_only_grow(&db.0);
        // A second node on the same schema, and the first again: one sequence.
        let other = PgStore::open(&db.1).unwrap();
        assert_eq!(other.next_crl_number(0).unwrap(), 1_700_000_002);
        assert_eq!(db.0.next_crl_number(0).unwrap(), 1_700_000_003);
        drop(other);
        assert_eq!(
            PgStore::open(&db.1).unwrap().next_crl_number(0).unwrap(),
            1_700_000_004
        );
    }

    /// The whole-store comparison reads every table of the schema (the CRL number too), but
    /// not the nodes' heartbeats.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn raw_records_hold_every_table_but_the_heartbeats() {
        let db = TestDb::new();
        db.0.add_line(&crate::store::test_support::line(10), "test")
            .unwrap();
        let before = db.0.raw_records().unwrap();
        db.0.heartbeat("instance-1", "node-1", Duration::from_secs(1))
            .unwrap();
        assert_eq!(
            db.0.raw_records().unwrap(),
            before,
            "a heartbeat is no record"
        );
        db.0.next_crl_number(0).unwrap();
        let after = db.0.raw_records().unwrap();
        let changed: Vec<_> = after.iter().filter(|r| !before.contains(r)).collect();
        assert_eq!(changed.len(), 1, "{changed:?}");
        assert_eq!(changed[0].0, "crl_number");
        let tables: std::collections::BTreeSet<&str> =
            after.iter().map(|(t, _, _)| t.as_str()).collect();
        for (t, _) in TABLES {
            if ["lines", "audit", "audit_head"].contains(&t) {
                assert!(tables.contains(t), "{t}");
            }
        }
        assert!(tables.contains("imprint_schema") && !tables.contains("nodes"));
    }

    #[test]
    fn a_batch_of_enrollments_sees_its_own_writes_and_chains_its_audit_entries() {
        crate::store::test_support::batch_sees_its_own_writes(&TestDb::new().0);
    }

    #[test]
    fn enrollments_and_secrets_writes_share_one_transaction_in_order() {
        crate::store::test_support::enrollments_and_secrets_share_a_batch(&TestDb::new().0);
    }

    #[test]
    fn a_pool_key_imported_and_given_out_in_one_batch() {
        crate::store::test_support::pool_key_imported_and_given_out_in_one_batch(&TestDb::new().0);
    }

    async fn backend_pid(c: &Conn) -> Result<i32, StoreError> {
        Ok(c.client()?
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .map_err(pg)?
            .get(0))
    }

    /// A batch opens its transaction by hand (its `BEGIN` goes with its reads). A connection
    /// dropped before that transaction ended (the call's time limit cancelled it) is closed,
    /// never handed to the next caller inside the transaction; one dropped outside any is
    /// reused.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn a_connection_dropped_inside_a_transaction_opened_by_hand_is_not_reused() {
        let db = TestDb::new();
        let (reused, after_open) =
            db.0.run(|pool| async move {
                let first = pool.get().await?;
                let p1 = backend_pid(&first).await?;
                drop(first);
                let second = pool.get().await?;
                let p2 = backend_pid(&second).await?;
                second.open.store(true, Ordering::SeqCst);
                second.client()?.batch_execute("BEGIN").await.map_err(pg)?;
                drop(second);
                let third = pool.get().await?;
                let p3 = backend_pid(&third).await?;
                Ok((p1 == p2, p3 != p2))
            })
            .unwrap();
        assert!(
            reused,
            "a connection dropped outside a transaction is reused"
        );
        assert!(
            after_open,
            "the one dropped inside a transaction was not reused"
        );
    }

    /// A batch that fails before its `BEGIN` was sent (here: a statement that cannot be
    /// prepared) sends no `ROLLBACK`: outside a transaction that draws a WARNING, which this
    /// store counts as a commit the synchronous standby may not have confirmed.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn a_batch_that_fails_before_its_begin_draws_no_warning() {
        use crate::store::test_support::{enrollment, line};
        let db = TestDb::new();
        db.0.add_line(&line(100), "t").unwrap();
        db.0.run(|pool| async move {
            let conn = pool.get().await?;
            conn.client()?
                .batch_execute("DROP TABLE device_resets")
                .await
                .map_err(pg)
        })
        .unwrap();
        let before = db.0.pool.warnings.load(Ordering::SeqCst);
        let r = db.0.apply_writes(&[
            Write::Enroll(enrollment(1, 1, 1)),
            Write::Enroll(enrollment(2, 2, 2)),
        ]);
        assert!(r.is_err(), "{r:?}");
        assert_eq!(db.0.pool.warnings.load(Ordering::SeqCst), before);
    }

    #[test]
    fn a_fetch_read_gives_what_the_single_reads_give() {
        crate::store::test_support::fetch_read_gives_what_the_single_reads_give(&TestDb::new().0);
    }

    /// Sequential and index scans of each table of the test's schema, after the connection the
    /// pool hands out (the batches' own: they ran one after the other) has flushed its
    /// statistics.
    #[allow(clippy::unwrap_used)]
    fn scans(store: &PgStore) -> HashMap<String, (i64, i64)> {
        store
            .run(|pool| async move {
                let conn = pool.get().await?;
                let c = conn.client()?;
                c.query("SELECT pg_stat_force_next_flush()", &[])
                    .await
                    .map_err(pg)?;
                let rows = c
                    .query(
                        "SELECT relname::text, coalesce(seq_scan, 0), coalesce(idx_scan, 0) FROM pg_stat_user_tables WHERE schemaname = current_schema()",
                        &[],
                    )
                    .await
                    .map_err(pg)?;
                rows.iter()
                    .map(|r| {
                        Ok((
                            r.try_get(0).map_err(pg)?,
                            (r.try_get(1).map_err(pg)?, r.try_get(2).map_err(pg)?),
                        ))
                    })
                    .collect()
            })
            .unwrap()
    }

    /// The batch's statements take arrays. From the first batch on, while the tables are still
    /// empty, none scans a whole table (a generic plan made then used to be a sequential scan
    /// that grew with every device stored), and each is planned once per connection, not per
    /// call (planning every call cost the database about a fifth of its CPU); so is the secret
    /// fetch's read of the pool.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn the_batch_statements_are_planned_once_and_never_scan_a_table() {
        use crate::store::test_support::{enrollment, line};
        let db = TestDb::new();
        let store = &db.0;
        store.add_line(&line(100_000), "t").unwrap();
        let before = scans(store);
        let keys = crate::secrets::SecretKeys::new(&[7u8; 32]).unwrap();
        // More calls than the five custom plans after which a generic one may be kept.
        for serial in 1..=12u64 {
            let e = enrollment(serial, serial as u8, serial as u8);
            let binding = e.key_hash;
            let secret = keys.generate().unwrap();
            let mut record = keys
                .seal_version(
                    serial,
                    1,
                    keys.new_key_id().unwrap(),
                    secret.as_ref(),
                    "csprng",
                    2_000,
                )
                .unwrap();
            record.delivered_at = Some(2_000);
            let ack = SecretOp::Ack {
                serial,
                key_id: record.key_id.clone(),
                version: 1,
                kcv: record.kcv.clone(),
                at: 2_001,
                binding,
                certificate: None,
            };
            let allocate = SecretOp::Allocate {
                record,
                from_pool: None,
                binding,
            };
            store
                .apply_writes(&[Write::Enroll(e), Write::Secret(allocate)])
                .unwrap();
            store.apply_writes(&[Write::Secret(ack)]).unwrap();
        }
        // The secret fetch's read of the pool's first entries, planned once too.
        for _ in 0..10 {
            assert!(store.pool(0, 16).unwrap().is_empty());
        }
        let after = scans(store);
        let delta = |t: &str, i: usize| {
            let (b, a) = (before.get(t).copied().unwrap_or_default(), after[t]);
            if i == 0 { a.0 - b.0 } else { a.1 - b.1 }
        };
        assert!(
            delta("devices", 1) > 0,
            "the statistics were flushed: {after:?}"
        );
        for table in after.keys() {
            assert_eq!(
                delta(table, 0),
                0,
                "sequential scans of {table}: {before:?} -> {after:?}"
            );
        }
        let plans: Vec<(String, i64, i64)> = store
            .run(|pool| async move {
                let conn = pool.get().await?;
                let rows = conn
                    .client()?
                    .query(
                        "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements WHERE (statement LIKE '%unnest(%' OR statement LIKE '%ANY($1)%' OR statement LIKE '%FROM secret_pool ORDER BY%') AND statement NOT LIKE '%pg_prepared_statements%'",
                        &[],
                    )
                    .await
                    .map_err(pg)?;
                rows.iter()
                    .map(|r| Ok((r.try_get(0).map_err(pg)?, r.try_get(1).map_err(pg)?, r.try_get(2).map_err(pg)?)))
                    .collect()
            })
            .unwrap();
        assert!(plans.len() >= 5, "{plans:?}");
        for (statement, generic, custom) in plans {
            assert_eq!(
                custom, 0,
                "{statement}: {custom} custom plans, {generic} generic"
            );
        }
    }

    /// A version-1 schema (before audit entries named their node) is refused by `open`, which
    /// says to migrate; after `migrate` it opens, the entries written before keep their chain,
    /// and new ones name the node.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn a_version_1_schema_is_refused_until_migrated_and_keeps_its_chain() {
        let db = TestDb::new();
        db.0.add_line(&crate::store::test_support::line(10), "t")
            .unwrap();
        db.0.apply_enrollment(&crate::store::test_support::enrollment(1, 1, 1))
            .unwrap();
        // Back to version 1, as a database made by the previous build is.
        db.0.run(|pool| async move {
            let conn = pool.get().await?;
            conn.client()?
                .batch_execute(
                    "DROP TABLE crl_number; DROP TABLE nodes; DROP TABLE operator_revocations; \
                     DROP TABLE dukpt_bdks; ALTER TABLE lines DROP COLUMN secret_source; \
                     ALTER TABLE audit DROP COLUMN node; ALTER TABLE audit DROP COLUMN mac; \
                     DELETE FROM imprint_schema WHERE version >= 2",
                )
                .await
                .map_err(pg)
        })
        .unwrap();
        let refused = PgStore::open(&db.1).unwrap_err().to_string();
        assert!(
            refused.contains("version 1, older") && refused.contains("store migrate"),
            "{refused}"
        );
        assert_eq!(PgStore::migrate(&db.1).unwrap(), 1, "the version it found");
        let store = PgStore::open(&db.1).unwrap();
        let verdict = crate::audit::verify(store.audit_raw(0), None, None, None).unwrap();
        assert_eq!((verdict.entries, verdict.first_bad), (2, None));
        assert!(store.audit().all(|e| e.unwrap().node.is_none()));
        // Version 3's table is there: an operator revocation is recorded, in the chain.
        // Version 7's column is there: with the audit key, the entries written from now on are
        // sealed; the two before stay as they were, vouched for by the first sealed one.
        let key = crate::audit::AuditKey::new(&[9u8; 32]);
        store.set_audit_key(key.clone());
        store.revoke_operator("bob", 5, "operator:alice").unwrap();
        assert_eq!(store.operator_revocations().unwrap().len(), 1);
        let verdict = crate::audit::verify(store.audit_raw(0), None, None, None).unwrap();
        assert_eq!((verdict.entries, verdict.first_bad), (3, None));
        let verdict = crate::audit::verify(store.audit_raw(0), None, Some(&key), None).unwrap();
        assert_eq!(
            (verdict.entries, verdict.first_bad, verdict.keyed_from),
            (3, None, Some(3))
        );
        assert!(store.last_audit().unwrap().unwrap().mac.is_some());
    }

    /// A version-7 schema (before a BDK could be an object in the CA's token) with a sealed
    /// BDK is refused by `open` until migrated; then the sealed BDK reads as before, a BDK held
    /// in the token is stored with no key bytes (NULL ciphertext and nonce), and the table
    /// refuses a row that is both or neither.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn a_version_7_schema_keeps_its_sealed_bdks_and_then_takes_token_ones() {
        let db = TestDb::new();
        let sealed = BdkRecord {
            id: "0000AAAA".into(),
            algorithm: "aes-128".into(),
            ciphertext: vec![1; 32],
            nonce: vec![2; 12],
            kcv: vec![3; 5],
            created_at: 9,
            token_object: None,
        };
        // Back to version 7, with a BDK as that version wrote it.
        db.0.run(|pool| async move {
            let conn = pool.get().await?;
            conn.client()?
                .batch_execute(
                    "ALTER TABLE dukpt_bdks DROP CONSTRAINT dukpt_bdks_custody; \
                     ALTER TABLE dukpt_bdks DROP COLUMN token_object; \
                     ALTER TABLE dukpt_bdks ALTER COLUMN ciphertext SET NOT NULL, ALTER COLUMN nonce SET NOT NULL; \
                     DELETE FROM imprint_schema WHERE version >= 8; \
                     INSERT INTO dukpt_bdks (id, algorithm, ciphertext, nonce, kcv, created_at) VALUES \
                     ('0000AAAA', 'aes-128', decode(repeat('01', 32), 'hex'), decode(repeat('02', 12), 'hex'), decode(repeat('03', 5), 'hex'), 9)",
                )
                .await
                .map_err(pg)
        })
        .unwrap();
        let refused = PgStore::open(&db.1).unwrap_err().to_string();
        assert!(refused.contains("version 7, older"), "{refused}");
        assert_eq!(PgStore::migrate(&db.1).unwrap(), 7, "the version it found");
        let store = PgStore::open(&db.1).unwrap();
        assert_eq!(store.bdks().unwrap(), vec![sealed.clone()]);

        let held = BdkRecord {
            id: "0000BBBB".into(),
            algorithm: "aes-256".into(),
            ciphertext: Vec::new(),
            nonce: Vec::new(),
            kcv: vec![4; 5],
            created_at: 10,
            token_object: Some("ca-bdk-0000BBBB".into()),
        };
        store.add_bdk(&held, "t").unwrap();
        assert_eq!(store.bdks().unwrap(), vec![sealed, held]);
        let (no_bytes, both, neither) = store
            .run(|pool| async move {
                let conn = pool.get().await?;
                let c = conn.client()?;
                let r = c
                    .query_one(
                        "SELECT ciphertext IS NULL AND nonce IS NULL FROM dukpt_bdks WHERE id = '0000BBBB'",
                        &[],
                    )
                    .await
                    .map_err(pg)?;
                let both = c
                    .batch_execute(
                        "INSERT INTO dukpt_bdks (id, algorithm, ciphertext, nonce, kcv, created_at, token_object) VALUES ('0000CCCC', 'aes-128', '\\x01', '\\x02', '\\x03', 1, 'x')",
                    )
                    .await;
                let neither = c
                    .batch_execute(
                        "INSERT INTO dukpt_bdks (id, algorithm, kcv, created_at) VALUES ('0000DDDD', 'aes-128', '\\x03', 1)",
                    )
                    .await;
                Ok((r.try_get::<_, bool>(0).map_err(pg)?, both.is_err(), neither.is_err()))
            })
            .unwrap();
        assert!(no_bytes, "a token BDK's row holds key bytes");
        assert!(
            both && neither,
            "the table took a BDK both sealed and in a token, or neither"
        );
        assert_eq!(store.bdks().unwrap().len(), 2);
    }

    #[test]
    fn the_fast_path_read_names_the_device_columns() {
        assert!(BINDING_OF.starts_with(&format!("SELECT {DEVICE_COLUMNS}, ")));
    }
}
