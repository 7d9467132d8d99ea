//! Group commit: one thread applies enrollments to the store and makes each batch durable with
//! one flush, then answers everybody in the batch. While it syncs, new requests queue up and form
//! the next batch, so durability costs one fdatasync per batch, not per device.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::store::{
    EnrollOutcome, NewEnrollment, SecretOp, SecretOutcome, Store, StoreError, Write, Written,
};

/// Largest batch applied before a flush.
const MAX_BATCH: usize = 2048;
/// A store that other processes share (PostgreSQL) pays for each batch with a transaction of
/// about fifteen statements, whatever its size: a batch that found fewer than [`LINGER_BELOW`]
/// writes waiting waits [`LINGER`] once for more before it starts. (sled's batch costs two log
/// writes and takes no wait.)
const LINGER_BELOW: usize = 16;
/// See [`LINGER_BELOW`].
const LINGER: Duration = Duration::from_millis(2);
/// How long a reader waits for a flush before giving up with an internal error.
const DURABLE_WAIT: Duration = Duration::from_secs(30);

/// Called once the batch is synced, with the sync's result.
type Reply = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
/// Applies one operation to the store (not yet durable) and returns how to answer it.
type Run = Box<dyn FnOnce(&dyn Store) -> Reply + Send>;
/// Where a write's outcome goes once its batch is durable.
type WriteReply = oneshot::Sender<Result<Written, StoreError>>;

/// One queued write.
enum Job {
    /// An enrollment or a secrets write: consecutive ones in a batch are applied as one store
    /// write ([`Store::apply_writes`]).
    Write(Box<Write>, WriteReply),
    /// Any other write.
    Run(Run),
}

/// One outcome per write: all of them in one store write, or, when that fails (a damaged record
/// that one of them reads aborts the whole transaction), each in a store write of its own, so
/// that only the write that meets the damage fails and the rest of the batch goes on.
fn apply_writes(store: &dyn Store, writes: &[Write]) -> Vec<Result<Written, StoreError>> {
    let one = |w: &Write| -> Result<Written, StoreError> {
        match store.apply_writes(std::slice::from_ref(w)) {
            Ok(mut o) if o.len() == 1 => o
                .pop()
                .ok_or_else(|| StoreError::Backend("no outcome".into())),
            Ok(o) => Err(StoreError::Backend(format!(
                "{} outcomes for one write",
                o.len()
            ))),
            Err(e) => Err(e),
        }
    };
    match store.apply_writes(writes) {
        Ok(o) if o.len() == writes.len() => o.into_iter().map(Ok).collect(),
        Ok(o) => {
            let n = writes.len();
            vec![
                Err(StoreError::Backend(format!(
                    "{} outcomes for {n} writes",
                    o.len()
                )));
                n
            ]
        }
        Err(e) if writes.len() > 1 => {
            tracing::warn!(error = %e, writes = writes.len(), "batched store write failed; applying its writes one by one");
            writes.iter().map(one).collect()
        }
        Err(e) => vec![Err(e)],
    }
}

/// Applies a batch's jobs in order: each run of consecutive enrollments and secrets writes as
/// one store write (one sled transaction, whose fixed cost is two log-buffer writes), other
/// jobs one by one.
fn apply(store: &dyn Store, jobs: &mut Vec<Job>) -> Vec<Reply> {
    let mut replies: Vec<Reply> = Vec::with_capacity(jobs.len());
    let mut writes: Vec<Write> = Vec::new();
    let mut senders: Vec<WriteReply> = Vec::new();
    let mut jobs = jobs.drain(..).peekable();
    while let Some(job) = jobs.next() {
        match job {
            Job::Run(run) => replies.push(run(store)),
            Job::Write(w, reply) => {
                writes.push(*w);
                senders.push(reply);
                if matches!(jobs.peek(), Some(Job::Write(..))) {
                    continue;
                }
                let outcomes = apply_writes(store, &writes);
                writes.clear();
                for (reply, outcome) in senders.drain(..).zip(outcomes) {
                    replies.push(Box::new(move |synced: Result<(), StoreError>| {
                        // The requester may have gone away; the write is durable and a retry
                        // will find it.
                        let _ = reply.send(synced.and(outcome));
                    }));
                }
            }
        }
    }
    replies
}

/// Statistics of the committer, for metrics and benchmarks.
#[derive(Debug, Default)]
pub struct CommitStats {
    /// Batches flushed.
    pub batches: AtomicU64,
    /// Enrollments applied.
    pub applied: AtomicU64,
    /// Largest batch so far.
    pub max_batch: AtomicU64,
}

/// Handle to the committer thread.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Job>,
    /// Number of the batch being applied (or last applied).
    started: Arc<AtomicU64>,
    durable: watch::Receiver<u64>,
    stats: Arc<CommitStats>,
}

impl std::fmt::Debug for Committer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Committer")
            .field("started", &self.started.load(Ordering::Relaxed))
            .field("durable", &*self.durable.borrow())
            .finish()
    }
}

impl Committer {
    /// Starts the committer thread over `store`.
    pub fn start(
        store: Arc<dyn Store>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<Self, String> {
        let (tx, mut rx) = mpsc::channel::<Job>(MAX_BATCH * 4);
        let started = Arc::new(AtomicU64::new(0));
        let (durable_tx, durable) = watch::channel(0u64);
        let stats = Arc::new(CommitStats::default());
        let (s2, st2) = (started.clone(), stats.clone());
        let linger = store.shared();
        std::thread::Builder::new()
            .name("group-commit".into())
            .spawn(move || {
                let mut epoch = 0u64;
                let mut batch = Vec::with_capacity(MAX_BATCH);
                while let Some(first) = rx.blocking_recv() {
                    batch.push(first);
                    let mut waited = !linger;
                    loop {
                        while batch.len() < MAX_BATCH {
                            match rx.try_recv() {
                                Ok(job) => batch.push(job),
                                Err(_) => break,
                            }
                        }
                        if waited || batch.len() >= LINGER_BELOW {
                            break;
                        }
                        waited = true;
                        std::thread::sleep(LINGER);
                    }
                    epoch += 1;
                    s2.store(epoch, Ordering::SeqCst);
                    let replies = apply(store.as_ref(), &mut batch);
                    let sync_started = std::time::Instant::now();
                    let synced = store.sync();
                    metrics.commit(replies.len(), sync_started.elapsed());
                    if let Err(e) = &synced {
                        tracing::error!(error = %e, "store sync failed; answering the batch with internal errors");
                    } else {
                        durable_tx.send_replace(epoch);
                    }
                    st2.batches.fetch_add(1, Ordering::Relaxed);
                    st2.applied.fetch_add(replies.len() as u64, Ordering::Relaxed);
                    st2.max_batch.fetch_max(replies.len() as u64, Ordering::Relaxed);
                    for reply in replies {
                        reply(synced.clone());
                    }
                }
            })
            .map_err(|e| format!("cannot start the group-commit thread: {e}"))?;
        Ok(Committer {
            tx,
            started,
            durable,
            stats,
        })
    }

    /// Applies enrollment `e` and returns once it is durable.
    pub async fn commit(&self, e: NewEnrollment) -> Result<EnrollOutcome, StoreError> {
        match self.write(Write::Enroll(e)).await? {
            Written::Enroll(o) => Ok(o),
            Written::Secret(_) => Err(StoreError::Backend(
                "a secrets outcome for an enrollment".into(),
            )),
        }
    }

    /// Applies secrets write `op` and returns once it is durable.
    pub async fn secret(&self, op: SecretOp) -> Result<SecretOutcome, StoreError> {
        match self.write(Write::Secret(op)).await? {
            Written::Secret(o) => Ok(o),
            Written::Enroll(_) => Err(StoreError::Backend(
                "an enrollment outcome for a secrets write".into(),
            )),
        }
    }

    async fn write(&self, w: Write) -> Result<Written, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::Write(Box::new(w), reply))
            .await
            .map_err(|_| StoreError::Backend("the group-commit thread has stopped".into()))?;
        rx.await.map_err(|_| {
            StoreError::Backend("the group-commit thread dropped the request".into())
        })?
    }

    /// Runs `op` on the committer thread, inside a batch, and returns its result once the
    /// batch is durable. Every write that must be on disk before an answer goes through here.
    pub async fn run<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel::<Result<T, StoreError>>();
        let job: Run = Box::new(move |store: &dyn Store| {
            let result = op(store);
            Box::new(move |synced: Result<(), StoreError>| {
                let answer = match (synced, result) {
                    (Ok(()), Ok(v)) => Ok(v),
                    (Err(e), _) => Err(e),
                    (_, Err(e)) => Err(e),
                };
                // The requester may have gone away (connection closed); that is fine, the
                // write is durable and a retry will find it.
                let _ = reply.send(answer);
            }) as Reply
        });
        self.tx
            .send(Job::Run(job))
            .await
            .map_err(|_| StoreError::Backend("the group-commit thread has stopped".into()))?;
        rx.await.map_err(|_| {
            StoreError::Backend("the group-commit thread dropped the request".into())
        })?
    }

    /// Waits until everything applied before this call is durable: a reader that found a record
    /// must not answer with it before the record's batch is on disk.
    pub async fn wait_durable(&self) -> Result<(), String> {
        let target = self.started.load(Ordering::SeqCst);
        let mut rx = self.durable.clone();
        let wait = rx.wait_for(|d| *d >= target);
        match tokio::time::timeout(DURABLE_WAIT, wait).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err("the group-commit thread has stopped".into()),
            Err(_) => Err("timed out waiting for the store to become durable".into()),
        }
    }

    /// Batch statistics.
    pub fn stats(&self) -> &CommitStats {
        &self.stats
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::store::SledStore;
    use crate::store::test_support::{self, line};

    fn enrollment(serial: u64) -> NewEnrollment {
        test_support::enrollment(serial, serial as u8, serial as u8)
    }

    #[test]
    fn a_damaged_record_fails_only_the_write_that_reads_it() {
        let tmp = tempfile::tempdir().unwrap();
        let store = SledStore::open(&tmp.path().join("store")).unwrap();
        store.add_line(&line(100), "operator:test").unwrap();
        store.damage_device_record_for_test(3);
        let mut receivers = Vec::new();
        let mut jobs = Vec::new();
        for serial in [1, 2, 3, 4] {
            let (tx, rx) = oneshot::channel();
            jobs.push(Job::Write(Box::new(Write::Enroll(enrollment(serial))), tx));
            receivers.push(rx);
        }
        let replies = apply(&store, &mut jobs);
        store.sync().unwrap();
        for reply in replies {
            reply(Ok(()));
        }
        let answers: Vec<String> = receivers
            .into_iter()
            .map(|mut rx| match rx.try_recv().unwrap() {
                Ok(Written::Enroll(EnrollOutcome::Created(r))) => format!("created {}", r.serial),
                Ok(other) => format!("{other:?}"),
                Err(e) => format!("error: {e}"),
            })
            .collect();
        assert_eq!(answers[0], "created 1");
        assert_eq!(answers[1], "created 2");
        assert!(answers[2].starts_with("error"), "{answers:?}");
        assert_eq!(answers[3], "created 4");
        assert!(store.device(4).unwrap().is_some());
    }

    /// A real sled store whose sync fails while `fail` is set, as a disk that returns EIO on
    /// fdatasync would (a real one cannot be made to fail on demand); everything else is the
    /// store's own.
    struct FailingSync {
        inner: SledStore,
        fail: std::sync::atomic::AtomicBool,
    }

    impl Store for FailingSync {
        fn sync(&self) -> Result<(), StoreError> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(StoreError::Backend("fdatasync: Input/output error".into()));
            }
            self.inner.sync()
        }
        fn device(&self, serial: u64) -> Result<Option<crate::records::DeviceRecord>, StoreError> {
            self.inner.device(serial)
        }
        fn serial_for_key(&self, key_hash: &[u8; 32]) -> Result<Option<u64>, StoreError> {
            self.inner.serial_for_key(key_hash)
        }
        fn line(&self, id: &str) -> Result<Option<crate::records::LineRecord>, StoreError> {
            self.inner.line(id)
        }
        fn lines(&self) -> Result<Vec<crate::records::LineRecord>, StoreError> {
            self.inner.lines()
        }
        fn add_line(&self, l: &crate::records::LineRecord, actor: &str) -> Result<(), StoreError> {
            self.inner.add_line(l, actor)
        }
        fn add_bdk(&self, b: &crate::records::BdkRecord, actor: &str) -> Result<(), StoreError> {
            self.inner.add_bdk(b, actor)
        }
        fn bdks(&self) -> Result<Vec<crate::records::BdkRecord>, StoreError> {
            self.inner.bdks()
        }
        fn dukpt_next(&self, bdk_id: &str) -> Result<u64, StoreError> {
            self.inner.dukpt_next(bdk_id)
        }
        fn apply_writes(&self, writes: &[Write]) -> Result<Vec<Written>, StoreError> {
            self.inner.apply_writes(writes)
        }
        fn secret_versions(
            &self,
            serial: u64,
        ) -> Result<Vec<crate::records::SecretRecord>, StoreError> {
            self.inner.secret_versions(serial)
        }
        fn pool(
            &self,
            skip: usize,
            n: usize,
        ) -> Result<Vec<crate::records::PoolEntry>, StoreError> {
            self.inner.pool(skip, n)
        }
        fn set_status(
            &self,
            serial: u64,
            status: crate::records::DeviceStatus,
            at: u64,
            actor: &str,
        ) -> Result<Option<crate::records::DeviceRecord>, StoreError> {
            self.inner.set_status(serial, status, at, actor)
        }
        fn reset_device(
            &self,
            serial: u64,
            at: u64,
            actor: &str,
        ) -> Result<crate::store::ResetOutcome, StoreError> {
            self.inner.reset_device(serial, at, actor)
        }
        fn history(&self, serial: u64) -> Result<Vec<crate::records::ResetRecord>, StoreError> {
            self.inner.history(serial)
        }
        fn revoked(&self) -> Result<Vec<crate::records::RevokedCert>, StoreError> {
            self.inner.revoked()
        }
        fn next_crl_number(&self, at_least: u64) -> Result<u64, StoreError> {
            self.inner.next_crl_number(at_least)
        }
        fn revoke_operator(
            &self,
            name: &str,
            at: u64,
            actor: &str,
        ) -> Result<crate::records::OperatorRevocation, StoreError> {
            self.inner.revoke_operator(name, at, actor)
        }
        fn operator_revocation(
            &self,
            name: &str,
        ) -> Result<Option<crate::records::OperatorRevocation>, StoreError> {
            self.inner.operator_revocation(name)
        }
        fn operator_revocations(
            &self,
        ) -> Result<Vec<crate::records::OperatorRevocation>, StoreError> {
            self.inner.operator_revocations()
        }
        fn change_line(
            &self,
            id: &str,
            change: crate::store::LineChange,
            at: u64,
            actor: &str,
        ) -> Result<Option<crate::records::LineRecord>, StoreError> {
            self.inner.change_line(id, change, at, actor)
        }
        fn record_event(
            &self,
            event: &str,
            serial: Option<u64>,
            actor: &str,
            detail: String,
            at: u64,
        ) -> Result<(), StoreError> {
            self.inner.record_event(event, serial, actor, detail, at)
        }
        fn set_audit_key(&self, key: crate::audit::AuditKey) {
            self.inner.set_audit_key(key)
        }
        fn last_audit(&self) -> Result<Option<crate::records::AuditEntry>, StoreError> {
            self.inner.last_audit()
        }
        fn audit_raw(
            &self,
            after: u64,
        ) -> Box<dyn Iterator<Item = Result<crate::store::RawAudit, StoreError>> + '_> {
            self.inner.audit_raw(after)
        }
        fn devices(
            &self,
        ) -> Box<dyn Iterator<Item = Result<crate::records::DeviceRecord, StoreError>> + '_>
        {
            self.inner.devices()
        }
        fn secrets(
            &self,
        ) -> Box<dyn Iterator<Item = Result<crate::records::SecretRecord, StoreError>> + '_>
        {
            self.inner.secrets()
        }
        fn index(
            &self,
            index: crate::store::Index,
        ) -> Box<dyn Iterator<Item = Result<crate::store::IndexEntry, StoreError>> + '_> {
            self.inner.index(index)
        }
        fn audit(
            &self,
        ) -> Box<dyn Iterator<Item = Result<crate::records::AuditEntry, StoreError>> + '_> {
            self.inner.audit()
        }
        fn raw_records(&self) -> Result<Vec<crate::store::RawRecord>, StoreError> {
            self.inner.raw_records()
        }
        fn size_on_disk(&self) -> Result<u64, StoreError> {
            self.inner.size_on_disk()
        }
    }

    #[tokio::test]
    async fn every_answer_waits_for_the_sync_and_carries_its_failure() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(FailingSync {
            inner: SledStore::open(&tmp.path().join("store")).unwrap(),
            fail: std::sync::atomic::AtomicBool::new(true),
        });
        store.add_line(&line(100), "operator:test").unwrap();
        let committer =
            Committer::start(store.clone(), Arc::new(crate::metrics::Metrics::new())).unwrap();
        // The committer applies the enrollment, its sync fails: the answer is the failure,
        // never the outcome of a write that may not be on disk.
        let e = committer
            .commit(enrollment(1))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("Input/output error"), "{e}");
        let e = committer
            .run(|s| s.record_event("lookup", Some(1), "test", String::new(), 1))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("Input/output error"), "{e}");
        // Once the disk syncs again, the device's retry finds its enrollment applied.
        store.fail.store(false, Ordering::SeqCst);
        match committer.commit(enrollment(1)).await.unwrap() {
            EnrollOutcome::Existing(r) => assert_eq!(r.serial, 1),
            other => panic!("{other:?}"),
        }
        match committer.commit(enrollment(2)).await.unwrap() {
            EnrollOutcome::Created(r) => assert_eq!(r.serial, 2),
            other => panic!("{other:?}"),
        }
        committer.wait_durable().await.unwrap();
    }
}
