//! The one writer: every change runs on one thread, and changes that queue
//! up while a commit is in progress share the next commit.
//!
//! LMDB has one writer at a time and a commit costs a sync to disk. A
//! request's change is short (a few puts), so the thread takes every change
//! waiting, up to [`GROUP`], runs each in a nested transaction of one write
//! transaction, and commits once: a change that fails is rolled back alone
//! (its nested transaction is aborted) and the others still commit. Only
//! after the commit does any caller hear its outcome, so a reply never
//! reports a change that a crash could still undo.
//!
//! Because every change of the service runs here one after another, two
//! changes that decide on the same records (two creates of one id, a
//! container delete and a task reservation) never interleave: the second
//! sees what the first wrote.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::Arc;

use heed::RwTxn;
use tokio::sync::oneshot;

use crate::error::{MetadataError, Result};
use crate::schema::Schema;

/// The most changes one commit holds; more wait for the next.
pub const GROUP: usize = 256;

/// What a finished change tells its caller once the commit is known.
type Finish = Box<dyn FnOnce(Option<Arc<heed::Error>>) + Send>;

/// A change: runs in its nested transaction, says whether to keep it, and
/// hands back how to report the outcome.
type Job = Box<dyn FnOnce(&Schema, &mut RwTxn) -> (bool, Finish) + Send>;

/// The handle to the writer thread; cloning it shares the thread, which
/// ends when the last handle is dropped.
#[derive(Clone)]
pub struct Writer {
    jobs: mpsc::Sender<Job>,
}

impl Writer {
    /// Starts the writer thread over `schema`.
    pub fn start(schema: Schema) -> Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("metadata-writer".into())
            .spawn(move || run(schema, queue))
            .map_err(|_| MetadataError::Writer("thread did not start"))?;
        Ok(Writer { jobs })
    }

    /// Runs `change` in the next commit and returns its outcome once that
    /// commit is durable. A change that fails writes nothing.
    pub async fn write<R, F>(&self, change: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Schema, &mut RwTxn) -> Result<R> + Send + 'static,
    {
        self.submit(change).await
    }

    /// Queues `change` now and returns the future of its outcome: changes
    /// run in the order they were submitted, so a caller can have several
    /// in flight and still know their order.
    pub fn submit<R, F>(&self, change: F) -> impl Future<Output = Result<R>> + Send + 'static
    where
        R: Send + 'static,
        F: FnOnce(&Schema, &mut RwTxn) -> Result<R> + Send + 'static,
    {
        let (reply, outcome) = oneshot::channel();
        let job: Job = Box::new(move |schema, txn| {
            let result = match catch_unwind(AssertUnwindSafe(|| change(schema, txn))) {
                Ok(result) => result,
                Err(_) => Err(MetadataError::Writer("change panicked")),
            };
            let keep = result.is_ok();
            let finish: Finish = Box::new(move |failed_commit| {
                let result = match (result, failed_commit) {
                    (Ok(_), Some(err)) => Err(MetadataError::Commit(err)),
                    (result, _) => result,
                };
                let _ = reply.send(result);
            });
            (keep, finish)
        });
        let sent = self.jobs.send(job);
        async move {
            sent.map_err(|_| MetadataError::Writer("stopped"))?;
            outcome
                .await
                .map_err(|_| MetadataError::Writer("stopped"))?
        }
    }
}

/// The writer thread: take what is queued, run it, commit once, report.
fn run(schema: Schema, queue: mpsc::Receiver<Job>) {
    while let Ok(first) = queue.recv() {
        let mut group = vec![first];
        while group.len() < GROUP {
            match queue.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        commit_group(&schema, group);
    }
}

/// Runs one group of changes in one write transaction.
fn commit_group(schema: &Schema, group: Vec<Job>) {
    let mut finishers: Vec<Finish> = Vec::with_capacity(group.len());
    let outcome = (|| -> Result<(), heed::Error> {
        let mut txn = schema.env.write_txn()?;
        let mut jobs = group.into_iter();
        for job in jobs.by_ref() {
            // A nested transaction per change, so a failed one is undone alone.
            let mut nested = schema.env.nested_write_txn(&mut txn)?;
            let (keep, finish) = job(schema, &mut nested);
            finishers.push(finish);
            if keep {
                nested.commit()?;
            }
        }
        txn.commit()
    })();

    // A failed transaction fails every change in it, including those never
    // run (their closures are dropped, which tells their callers so).
    let failed = outcome.err().map(|err| {
        tracing::error!(error = %err, "metadata commit failed");
        Arc::new(err)
    });
    for finish in finishers {
        finish(failed.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_proto::metadata::Image;

    fn schema() -> (tempfile::TempDir, Schema) {
        let dir = tempfile::tempdir().unwrap();
        let schema = Schema::open(dir.path()).unwrap();
        (dir, schema)
    }

    fn image(name: &str) -> Image {
        Image {
            name: name.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_failed_change_is_undone_alone() {
        let (_dir, schema) = schema();
        let writer = Writer::start(schema.clone()).unwrap();

        // Many at once, so several share a commit; every odd one fails after
        // writing.
        let mut pending = Vec::new();
        for n in 0..64u32 {
            let writer = writer.clone();
            pending.push(tokio::spawn(async move {
                writer
                    .write(move |schema, txn| {
                        let name = format!("i{n}");
                        schema.images.put(txn, "ns", &name, &image(&name))?;
                        if n % 2 == 1 {
                            return Err(MetadataError::Writer("refused"));
                        }
                        Ok(n)
                    })
                    .await
            }));
        }
        for (n, handle) in pending.into_iter().enumerate() {
            let outcome = handle.await.unwrap();
            assert_eq!(outcome.is_ok(), n % 2 == 0, "change {n}");
        }

        let txn = schema.env.read_txn().unwrap();
        let names = schema.images.list(&txn, "ns").unwrap();
        assert_eq!(names.len(), 32);
        assert!(names
            .iter()
            .all(|i| i.name[1..].parse::<u32>().unwrap() % 2 == 0));
    }

    #[tokio::test]
    async fn a_panicking_change_fails_without_stopping_the_writer() {
        let (_dir, schema) = schema();
        let writer = Writer::start(schema).unwrap();
        let panicked = writer.write(|_, _| -> Result<()> { panic!("boom") }).await;
        assert!(matches!(panicked, Err(MetadataError::Writer(_))));
        let after = writer.write(|_, _| Ok(7)).await.unwrap();
        assert_eq!(after, 7);
    }
}
