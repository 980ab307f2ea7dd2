//! The job's CPU pool: a fixed set of long-lived threads taking image work from one queue.
//!
//! Why not tokio's `spawn_blocking` behind a semaphore of `workers` permits, as the job first
//! did: there each image became runnable only after the previous one released its permit and
//! the async task ran again to hand the next closure to whichever blocking thread was free. That
//! thread had often gone to sleep in the meantime, and the scheduler woke it on a busy core while
//! the other went idle. Measured on 2 cores (300 photos, 2 workers, `/proc/stat`): 13-15 % of
//! the CPU time idle although two images were always in progress, and 3 permits ran 8 % faster
//! than 2. Here fetched images wait in the queue, so a thread that finishes one takes the next at
//! once without sleeping; the number of images in flight stays bounded by the caller (the job's
//! fetch concurrency), as before.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send>;

/// `threads` worker threads; dropping the pool lets queued work finish and joins them.
pub struct CpuPool {
    queue: Option<crossbeam_channel::Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl CpuPool {
    /// Starts `threads` (at least 1) threads named `NAME-I`.
    pub fn new(name: &str, threads: usize) -> std::io::Result<Self> {
        let (queue, jobs) = crossbeam_channel::unbounded::<Job>();
        let threads = (0..threads.max(1))
            .map(|i| {
                let jobs = jobs.clone();
                std::thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn(move || {
                        for job in jobs {
                            job();
                        }
                    })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            queue: Some(queue),
            threads,
        })
    }

    /// Queues `work`; the future gives its result, or the panic's message when it panicked.
    /// Work whose future was dropped before a thread took it is skipped (a job that stops
    /// early does not wait for the images still queued).
    pub fn run<T, F>(&self, work: F) -> impl Future<Output = Result<T, String>> + use<T, F>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            if done.is_closed() {
                return;
            }
            let outcome = catch_unwind(AssertUnwindSafe(work))
                .map_err(|panic| shards::panic_message(panic.as_ref()));
            let _ = done.send(outcome);
        });
        let queued = self
            .queue
            .as_ref()
            .expect("the queue lives as long as the pool")
            .send(job);
        async move {
            queued.map_err(|_| "the CPU pool has stopped".to_string())?;
            result
                .await
                .map_err(|_| "the CPU pool has stopped".to_string())?
        }
    }
}

impl Drop for CpuPool {
    /// Runs the work still queued (unless its future is gone), then joins the threads.
    fn drop(&mut self) {
        drop(self.queue.take());
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::{Arc, Barrier};

    #[tokio::test]
    async fn runs_work_on_its_threads_and_returns_results() {
        let pool = CpuPool::new("test-cpu", 2).unwrap();
        let results =
            futures::future::join_all((0..20u64).map(|i| pool.run(move || (i * i, thread_name()))))
                .await;
        let mut names = HashSet::new();
        for (i, result) in results.into_iter().enumerate() {
            let (square, name) = result.unwrap();
            assert_eq!(square, (i * i) as u64);
            names.insert(name);
        }
        assert!(
            names.iter().all(|n| n.starts_with("test-cpu-")),
            "{names:?}"
        );
    }

    #[tokio::test]
    async fn threads_work_at_the_same_time() {
        // Both jobs wait for each other: they finish only if two threads run them together.
        let pool = CpuPool::new("test-cpu", 2).unwrap();
        let barrier = Arc::new(Barrier::new(2));
        let jobs = (0..2).map(|_| {
            let barrier = barrier.clone();
            pool.run(move || barrier.wait().is_leader())
        });
        let leaders = futures::future::join_all(jobs).await;
        assert_eq!(
            leaders.into_iter().filter(|l| *l.as_ref().unwrap()).count(),
            1
        );
    }

    #[tokio::test]
    async fn a_panic_is_an_error_with_its_message_and_the_pool_goes_on() {
        let pool = CpuPool::new("test-cpu", 1).unwrap();
        let error = pool
            .run(|| -> u8 { panic!("decoder bug in {}", "x.jpg") })
            .await
            .unwrap_err();
        assert_eq!(error, "decoder bug in x.jpg");
        assert_eq!(pool.run(|| 7).await.unwrap(), 7);
    }

    #[tokio::test]
    async fn work_whose_future_is_dropped_is_skipped_and_the_rest_runs() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let pool = CpuPool::new("test-cpu", 1).unwrap();
        // Hold the only thread until everything is queued.
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let blocker = pool.run(move || wait.recv().unwrap());
        let counter = Arc::new(AtomicUsize::new(0));
        let count = || {
            let counter = counter.clone();
            move || counter.fetch_add(1, SeqCst)
        };
        for _ in 0..5 {
            drop(pool.run(count()));
        }
        let kept = pool.run(count());
        release.send(()).unwrap();
        blocker.await.unwrap();
        assert_eq!(kept.await.unwrap(), 0, "the dropped ones ran first");
        drop(pool);
        assert_eq!(counter.load(SeqCst), 1);
    }

    fn thread_name() -> String {
        std::thread::current().name().unwrap_or("").to_string()
    }
}
