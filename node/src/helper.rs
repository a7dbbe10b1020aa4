//! A shard's helper thread: the blocking work a shard needs (writing and
//! verifying snapshots, deleting files) runs here, one job at a time, so the
//! shard thread never blocks and never starts a thread per job.
//!
//! The queue is bounded ([`MAX_QUEUED_JOBS`]); a job that does not fit is
//! handed back at once and the caller treats it as failed or tries again
//! later. The thread ends when the shard drops its last handle; it is never
//! joined (a shard thread must not wait for it), and a job cut short by the
//! process exiting leaves only temp files that the next start ignores.

use std::io;

/// Jobs waiting for the helper thread, per shard.
pub const MAX_QUEUED_JOBS: usize = 16;

/// One piece of blocking work.
pub type Job = Box<dyn FnOnce() + Send + 'static>;

/// The queue was full: the job was not taken (and is dropped).
#[derive(Debug, thiserror::Error)]
#[error("the shard's helper thread is busy ({MAX_QUEUED_JOBS} jobs queued)")]
pub struct Busy;

/// Hands jobs to one shard's helper thread. Cheap to clone.
#[derive(Clone)]
pub struct Helper {
    jobs: flume::Sender<Job>,
}

impl Helper {
    /// Starts the helper thread of `shard`.
    pub fn start(shard: u32) -> io::Result<Helper> {
        let (jobs, queue) = flume::bounded::<Job>(MAX_QUEUED_JOBS);
        std::thread::Builder::new()
            .name(format!("corekv-helper-{shard}"))
            .spawn(move || {
                while let Ok(job) = queue.recv() {
                    job();
                }
            })?;
        Ok(Helper { jobs })
    }

    /// Queues `job`; `Err(Busy)` when the queue is full.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) -> Result<(), Busy> {
        self.jobs.try_send(Box::new(job)).map_err(|_| Busy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn jobs_run_in_order_and_a_full_queue_hands_the_job_back() {
        let helper = Helper::start(0).unwrap();
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel::<usize>();
        // The first job holds the thread until the gate opens.
        helper
            .submit(move || {
                gate_rx.recv().unwrap();
            })
            .unwrap();
        // Which jobs get in depends on when the thread takes the first one
        // off the queue (that frees a slot); whichever get in run in order.
        let mut taken = Vec::new();
        let mut refused = 0;
        for i in 0..MAX_QUEUED_JOBS + 5 {
            let done = done_tx.clone();
            match helper.submit(move || done.send(i).unwrap()) {
                Ok(()) => taken.push(i),
                Err(Busy) => refused += 1,
            }
        }
        assert!(
            refused >= 4,
            "a bounded queue refuses: taken {taken:?}, refused {refused}"
        );
        gate_tx.send(()).unwrap();
        let order: Vec<usize> = (0..taken.len()).map(|_| done_rx.recv().unwrap()).collect();
        assert_eq!(order, taken);
    }
}
