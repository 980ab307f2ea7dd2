//! Collective operations across the processes of a data-parallel run.
//!
//! Data-parallel SwAV needs a handful of global reductions besides the gradient all-reduce:
//! Sinkhorn-Knopp's total mass and per-prototype (row) sums, the global number of samples it
//! assigns, the global maximum it subtracts before `exp`, and the metrics a run logs. All of them
//! go through [`Collective`], so a single-process run ([`SingleProcess`]) and a multi-process run
//! execute the same code.
//!
//! # Contract
//! Collective operations are *collective*: every rank must call the same operations in the same
//! order, with tensors of the same shape and kind. A rank that skips one deadlocks the others. The
//! operations are blocking and in place: when a call returns, the tensor holds the reduced value on
//! every rank, on the tensor's own device and kind. A backend that loses a peer cannot let a rank
//! continue the step alone, so transport failures panic; c10d's process groups
//! ([`crate::dist::ProcessGroup`]) panic with a [`crate::dist::CollectiveFailure`] that the
//! trainer turns back into an error (the run restarts from its checkpoint).
//!
//! ```
//! use tch::Tensor;
//! use trainer::collective::{Collective, SingleProcess};
//!
//! let mut t = Tensor::from_slice(&[1.0f32, 2.0]);
//! SingleProcess.all_reduce_sum(&mut t); // identity with one process
//! assert_eq!(SingleProcess.world_size(), 1);
//! assert_eq!(SingleProcess.sum_f64(3.5), 3.5);
//! ```

use std::sync::{Arc, Barrier, Mutex, PoisonError};

use tch::{Device, Kind, Tensor};

/// Global reductions across the ranks of a data-parallel group. See the [module
/// documentation](self) for the calling contract.
pub trait Collective: Send + Sync {
    /// Number of ranks (processes) in the group.
    fn world_size(&self) -> usize;

    /// This process's rank, in `0..world_size()`.
    fn rank(&self) -> usize;

    /// Replaces `t`, element-wise, by the sum of `t` over all ranks.
    fn all_reduce_sum(&self, t: &mut Tensor);

    /// Replaces `t`, element-wise, by the maximum of `t` over all ranks.
    fn all_reduce_max(&self, t: &mut Tensor);

    /// Replaces `t` on every rank by its value on rank `root` (initial weights, resumed state).
    fn broadcast(&self, t: &mut Tensor, root: usize);

    /// Sums each of `tensors` over all ranks; a backend may do it in one call (Gloo's coalesced
    /// all-reduce), which is much faster than one call per tensor.
    fn all_reduce_sum_coalesced(&self, tensors: &mut [Tensor]) {
        for t in tensors {
            self.all_reduce_sum(t);
        }
    }

    /// Waits until every rank has called it.
    fn barrier(&self) {
        self.sum_f64(0.0);
    }

    /// Replaces `t` by its mean over all ranks (data-parallel gradient averaging).
    fn all_reduce_mean(&self, t: &mut Tensor) {
        self.all_reduce_sum(t);
        if self.world_size() > 1 {
            *t /= self.world_size() as f64;
        }
    }

    /// The sum of a host value over all ranks (metrics, sample counts).
    fn sum_f64(&self, value: f64) -> f64 {
        let mut t = Tensor::from_slice(&[value]);
        self.all_reduce_sum(&mut t);
        t.double_value(&[0])
    }
}

/// A [`Collective`] that adds up the wall time spent in its operations (communication, and
/// waiting for the slowest rank): the trainer's communication share.
pub struct Timed<'a> {
    inner: &'a dyn Collective,
    nanos: std::sync::atomic::AtomicU64,
}

impl<'a> Timed<'a> {
    /// Times `inner`.
    pub fn new(inner: &'a dyn Collective) -> Self {
        Timed {
            inner,
            nanos: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Time spent in operations so far.
    pub fn elapsed(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.nanos.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn time<T>(&self, f: impl FnOnce() -> T) -> T {
        let started = std::time::Instant::now();
        let value = f();
        let spent = started.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
        self.nanos
            .fetch_add(spent, std::sync::atomic::Ordering::Relaxed);
        value
    }
}

impl Collective for Timed<'_> {
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }

    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn all_reduce_sum(&self, t: &mut Tensor) {
        self.time(|| self.inner.all_reduce_sum(t));
    }

    fn all_reduce_max(&self, t: &mut Tensor) {
        self.time(|| self.inner.all_reduce_max(t));
    }

    fn broadcast(&self, t: &mut Tensor, root: usize) {
        self.time(|| self.inner.broadcast(t, root));
    }

    fn all_reduce_sum_coalesced(&self, tensors: &mut [Tensor]) {
        self.time(|| self.inner.all_reduce_sum_coalesced(tensors));
    }

    fn barrier(&self) {
        self.time(|| self.inner.barrier());
    }
}

/// The group of one: every reduction is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn world_size(&self) -> usize {
        1
    }

    fn rank(&self) -> usize {
        0
    }

    fn all_reduce_sum(&self, _t: &mut Tensor) {}

    fn all_reduce_max(&self, _t: &mut Tensor) {}

    fn broadcast(&self, _t: &mut Tensor, root: usize) {
        assert_eq!(root, 0, "broadcast root {root} outside a group of one");
    }
}

/// Ranks that are threads of one process, reducing through shared memory.
///
/// This is the reference implementation of the [`Collective`] contract that tests use to check
/// that a computation split over ranks equals the same computation on the whole batch (see
/// `swav::tests`). Values travel as `f64` on the host and reductions run in rank order, so every
/// rank gets bit-identical results. It is not meant to be fast.
pub struct ThreadGroup {
    rank: usize,
    shared: Arc<Shared>,
}

struct Shared {
    world_size: usize,
    barrier: Barrier,
    slots: Mutex<Vec<Vec<f64>>>,
}

impl ThreadGroup {
    /// Creates a group of `world_size` ranks; hand element `r` to the thread that plays rank `r`.
    pub fn new(world_size: usize) -> Vec<ThreadGroup> {
        assert!(world_size > 0, "a group needs at least one rank");
        let shared = Arc::new(Shared {
            world_size,
            barrier: Barrier::new(world_size),
            slots: Mutex::new(vec![Vec::new(); world_size]),
        });
        (0..world_size)
            .map(|rank| ThreadGroup {
                rank,
                shared: Arc::clone(&shared),
            })
            .collect()
    }

    /// Publishes this rank's values, lets `combine` see all ranks' values in rank order, and writes
    /// the combined values back into `t`.
    fn exchange(&self, t: &mut Tensor, combine: impl Fn(&[Vec<f64>]) -> Vec<f64>) {
        let flat = t
            .to_kind(Kind::Double)
            .to_device(Device::Cpu)
            .flatten(0, -1);
        let values = Vec::<f64>::try_from(&flat).expect("tensor values as f64");
        self.shared
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)[self.rank] = values;
        self.shared.barrier.wait();
        let combined = {
            let slots = self
                .shared
                .slots
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            assert!(
                slots.iter().all(|s| s.len() == slots[0].len()),
                "ranks reduced tensors of different sizes"
            );
            combine(&slots)
        };
        // Nobody may publish the next operation's values before every rank has read these.
        self.shared.barrier.wait();
        let result = Tensor::from_slice(&combined)
            .view(t.size().as_slice())
            .to_kind(t.kind())
            .to_device(t.device());
        t.copy_(&result);
    }
}

impl Collective for ThreadGroup {
    fn world_size(&self) -> usize {
        self.shared.world_size
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn all_reduce_sum(&self, t: &mut Tensor) {
        self.exchange(t, |slots| {
            (0..slots[0].len())
                .map(|i| slots.iter().map(|s| s[i]).sum())
                .collect()
        });
    }

    fn all_reduce_max(&self, t: &mut Tensor) {
        self.exchange(t, |slots| {
            (0..slots[0].len())
                .map(|i| slots.iter().map(|s| s[i]).fold(f64::NEG_INFINITY, f64::max))
                .collect()
        });
    }

    fn broadcast(&self, t: &mut Tensor, root: usize) {
        assert!(
            root < self.shared.world_size,
            "broadcast root {root} outside the group"
        );
        self.exchange(t, |slots| slots[root].clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_ranks<T: Send>(world_size: usize, f: impl Fn(ThreadGroup) -> T + Sync) -> Vec<T> {
        std::thread::scope(|scope| {
            let handles: Vec<_> = ThreadGroup::new(world_size)
                .into_iter()
                .map(|group| scope.spawn(|| f(group)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn single_process_is_the_identity() {
        let mut t = Tensor::from_slice(&[1.5f32, -2.0]);
        SingleProcess.all_reduce_sum(&mut t);
        SingleProcess.all_reduce_max(&mut t);
        SingleProcess.all_reduce_mean(&mut t);
        SingleProcess.broadcast(&mut t, 0);
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), [1.5, -2.0]);
        assert_eq!((SingleProcess.world_size(), SingleProcess.rank()), (1, 0));
    }

    #[test]
    fn thread_group_reduces_across_ranks() {
        let results = run_ranks(3, |group| {
            let r = group.rank() as f32;
            let mut sum = Tensor::from_slice(&[r, 10.0 * r]);
            group.all_reduce_sum(&mut sum);
            let mut max = Tensor::from_slice(&[r, -r]).view([1, 2]);
            group.all_reduce_max(&mut max);
            let mut mean = Tensor::from_slice(&[r]);
            group.all_reduce_mean(&mut mean);
            let mut broadcast = Tensor::from_slice(&[r + 100.0]);
            group.broadcast(&mut broadcast, 2);
            let count = group.sum_f64(1.0);
            (
                Vec::<f32>::try_from(&sum).unwrap(),
                Vec::<f32>::try_from(&max.flatten(0, -1)).unwrap(),
                Vec::<f32>::try_from(&mean).unwrap(),
                Vec::<f32>::try_from(&broadcast).unwrap(),
                count,
            )
        });
        for (sum, max, mean, broadcast, count) in results {
            assert_eq!(sum, [3.0, 30.0]);
            assert_eq!(max, [2.0, 0.0]);
            assert_eq!(mean, [1.0]);
            assert_eq!(broadcast, [102.0]);
            assert_eq!(count, 3.0);
        }
    }
}
