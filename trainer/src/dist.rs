//! Data parallelism on PyTorch's distributed engine (c10d), through the C++ bridge
//! (`trainer/cpp/bridge.cpp`).
//!
//! A [`Store`] is c10d's `TCPStore` (rank 0 or torchrun's agent hosts it; every other rank
//! connects), a [`ProcessGroup`] is c10d's `ProcessGroupGloo` (CPU tensors) or
//! `ProcessGroupNCCL` (CUDA tensors, with the `nccl` feature) on a prefix of that store. A
//! process group implements [`Collective`], so the SwAV loss runs its distributed Sinkhorn on it
//! unchanged; [`GradientReducer`] averages gradients in buckets of a set size (few large
//! all-reduces are much faster than many small ones); [`ProcessGroup::sync_batch_norm`] is
//! SyncBatchNorm as a custom autograd function of the bridge, whose forward and backward sum
//! their statistics over a group.
//!
//! **Failures.** Every operation waits at most the group's timeout. The fallible methods
//! ([`ProcessGroup::all_reduce`], ...) return [`DistError`]; the [`Collective`] methods, which
//! cannot, panic with a [`CollectiveFailure`] payload that [`catch_collective_failure`] turns
//! back into an error (the trainer does so around the whole run), so a rank whose peer died or
//! hung stops with a message, not a hang.
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use tch::Tensor;
//! use trainer::collective::Collective;
//! use trainer::dist::{Backend, ProcessGroup, Store};
//!
//! # fn main() -> Result<(), trainer::dist::DistError> {
//! let (rank, world) = (0, 2); // rank 1 runs the same with rank = 1
//! let timeout = Duration::from_secs(60);
//! let store = Arc::new(Store::connect("127.0.0.1", 29500, rank == 0, timeout)?);
//! let group = ProcessGroup::new(&store, "main", rank, world, Backend::Gloo, timeout)?;
//! let mut t = Tensor::from_slice(&[rank as f32]);
//! group.all_reduce_sum(&mut t); // 1.0 on both ranks
//! # Ok(()) }
//! ```

use std::ffi::{CStr, CString, c_char};
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tch::{Device, Kind, Tensor};

use crate::collective::Collective;

/// A failure of the distributed engine.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DistError {
    /// The store at `host:port` could not be hosted or reached.
    #[error("rendezvous at {host}:{port} (rank {rank}) failed: {message}")]
    Rendezvous {
        /// The store's host.
        host: String,
        /// The store's port.
        port: u16,
        /// This rank.
        rank: usize,
        /// c10d's message.
        message: String,
    },
    /// A process group could not be created.
    #[error("creating the {backend} group {prefix:?} (rank {rank} of {size}) failed: {message}")]
    Group {
        /// Gloo or NCCL.
        backend: Backend,
        /// Its prefix in the store.
        prefix: String,
        /// This rank in it.
        rank: usize,
        /// Its size.
        size: usize,
        /// c10d's message.
        message: String,
    },
    /// A collective operation failed: a peer died, hung past the timeout, or the call was
    /// invalid.
    #[error(
        "rank {rank}: {operation} across {size} ranks failed (a peer exited or stopped \
         responding within {timeout_s} s?): {message}"
    )]
    Operation {
        /// The operation.
        operation: &'static str,
        /// This rank.
        rank: usize,
        /// The group's size.
        size: usize,
        /// The group's timeout in seconds.
        timeout_s: f64,
        /// c10d's message.
        message: String,
    },
}

/// The panic payload of a failed [`Collective`] call on a [`ProcessGroup`].
#[derive(Debug, Clone)]
pub struct CollectiveFailure(pub DistError);

impl fmt::Display for CollectiveFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Runs `f`; a [`CollectiveFailure`] panic inside becomes `Err`, any other panic goes on.
pub fn catch_collective_failure<T>(f: impl FnOnce() -> T) -> Result<T, DistError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(value) => Ok(value),
        Err(payload) => match payload.downcast::<CollectiveFailure>() {
            Ok(failure) => Err(failure.0),
            Err(other) => std::panic::resume_unwind(other),
        },
    }
}

/// Installs a panic hook that stays silent for [`CollectiveFailure`] panics (the error is
/// reported where [`catch_collective_failure`] catches it) and defers to the previous hook for
/// every other panic.
pub fn quiet_collective_failures() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if info.payload().downcast_ref::<CollectiveFailure>().is_none() {
            previous(info);
        }
    }));
}

/// Which c10d process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `ProcessGroupGloo`: CPU tensors.
    Gloo,
    /// `ProcessGroupNCCL`: CUDA tensors (needs the `nccl` feature).
    Nccl,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        })
    }
}

mod ffi {
    use std::ffi::{c_char, c_void};

    use torch_sys::C_tensor;

    pub type StorePtr = *mut c_void;
    pub type GroupPtr = *mut c_void;

    unsafe extern "C" {
        pub fn seer_free_error(message: *mut c_char);
        pub fn seer_store_new(
            host: *const c_char,
            port: u16,
            is_server: bool,
            world_size: i64,
            timeout_ms: i64,
            out: *mut StorePtr,
        ) -> *mut c_char;
        pub fn seer_store_free(store: StorePtr);
        pub fn seer_gloo_new(
            store: StorePtr,
            prefix: *const c_char,
            rank: i32,
            size: i32,
            timeout_ms: i64,
            interface: *const c_char,
            out: *mut GroupPtr,
        ) -> *mut c_char;
        pub fn seer_nccl_new(
            store: StorePtr,
            prefix: *const c_char,
            rank: i32,
            size: i32,
            timeout_ms: i64,
            out: *mut GroupPtr,
        ) -> *mut c_char;
        pub fn seer_group_free(group: GroupPtr);
        pub fn seer_all_reduce(
            group: GroupPtr,
            tensors: *mut *mut C_tensor,
            n: usize,
            op: i32,
        ) -> *mut c_char;
        pub fn seer_broadcast(group: GroupPtr, tensor: *mut C_tensor, root: i32) -> *mut c_char;
        pub fn seer_barrier(group: GroupPtr) -> *mut c_char;
        #[allow(clippy::too_many_arguments)]
        pub fn seer_sync_batch_norm(
            group: GroupPtr,
            input: *mut C_tensor,
            weight: *mut C_tensor,
            bias: *mut C_tensor,
            running_mean: *mut C_tensor,
            running_var: *mut C_tensor,
            momentum: f64,
            eps: f64,
            out: *mut *mut C_tensor,
        ) -> *mut c_char;
        pub fn seer_pin_memory(tensor: *mut C_tensor, out: *mut *mut C_tensor) -> *mut c_char;
    }
}

/// Takes the bridge's error message, if any.
fn take_error(message: *mut c_char) -> Result<(), String> {
    if message.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null message is a NUL-terminated string the bridge malloc'd for us; we
    // copy it and hand it back to the bridge's free exactly once.
    let text = unsafe { CStr::from_ptr(message) }
        .to_string_lossy()
        .into_owned();
    unsafe { ffi::seer_free_error(message) };
    Err(text)
}

/// A pinned (page-locked) copy of a CPU tensor, for asynchronous copies to the GPU: libtorch's
/// `pin_memory()` through the bridge, because tch's passes a device argument that libtorch 2.11
/// deprecates (a warning for every buffer pinned). Fails where no accelerator runtime is found.
pub fn pinned(tensor: &Tensor) -> Result<Tensor, String> {
    let mut input = tensor.shallow_clone();
    let mut out = std::ptr::null_mut();
    // SAFETY: a live tensor handle for the call; on success the bridge writes a new
    // heap-allocated `torch::Tensor*` that the returned Tensor owns.
    let error = unsafe { ffi::seer_pin_memory(input.as_mut_ptr(), &mut out) };
    take_error(error)?;
    // SAFETY: see above.
    Ok(unsafe { Tensor::from_ptr(out) })
}

fn millis(timeout: Duration) -> i64 {
    timeout.as_millis().clamp(1, i64::MAX as u128) as i64
}

/// c10d's `TCPStore`: the rendezvous of a run's processes.
pub struct Store {
    ptr: ffi::StorePtr,
    host: String,
    port: u16,
}

// SAFETY: c10d's TCPStore is used from many threads in PyTorch (its client serializes
// requests under a mutex); the handle is only freed on drop.
unsafe impl Send for Store {}
// SAFETY: as above.
unsafe impl Sync for Store {}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Store({}:{})", self.host, self.port)
    }
}

impl Store {
    /// Hosts (`is_server`) or connects to the store at `host:port`, retrying the connection
    /// until `timeout`.
    pub fn connect(
        host: &str,
        port: u16,
        is_server: bool,
        timeout: Duration,
    ) -> Result<Store, DistError> {
        let failed = |message: String| DistError::Rendezvous {
            host: host.to_owned(),
            port,
            rank: usize::from(!is_server),
            message,
        };
        let c_host = CString::new(host).map_err(|_| failed("a NUL byte in the host".into()))?;
        let mut ptr = std::ptr::null_mut();
        // SAFETY: valid C string and out pointer; the bridge catches every C++ exception.
        let error = unsafe {
            ffi::seer_store_new(
                c_host.as_ptr(),
                port,
                is_server,
                0,
                millis(timeout),
                &mut ptr,
            )
        };
        take_error(error).map_err(failed)?;
        Ok(Store {
            ptr,
            host: host.to_owned(),
            port,
        })
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: created by seer_store_new, freed once.
        unsafe { ffi::seer_store_free(self.ptr) }
    }
}

/// A c10d process group (Gloo or NCCL) of `size` ranks; implements [`Collective`].
pub struct ProcessGroup {
    ptr: ffi::GroupPtr,
    rank: usize,
    size: usize,
    backend: Backend,
    timeout: Duration,
    // The group's store must outlive it.
    _store: Option<Arc<Store>>,
}

// SAFETY: c10d backends are driven from several threads in PyTorch (DDP's reducer calls them
// from autograd threads); collective calls are serialized by the caller's contract anyway.
unsafe impl Send for ProcessGroup {}
// SAFETY: as above.
unsafe impl Sync for ProcessGroup {}

impl fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ProcessGroup({}, rank {} of {})",
            self.backend, self.rank, self.size
        )
    }
}

/// The reduction of [`ProcessGroup::all_reduce`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Element-wise sum.
    Sum,
    /// Element-wise maximum.
    Max,
}

impl ProcessGroup {
    /// Creates the group `prefix` of `size` ranks in `store` (every member calls this with its
    /// rank in the group). Operations wait at most `timeout`.
    pub fn new(
        store: &Arc<Store>,
        prefix: &str,
        rank: usize,
        size: usize,
        backend: Backend,
        timeout: Duration,
    ) -> Result<ProcessGroup, DistError> {
        let failed = |message: String| DistError::Group {
            backend,
            prefix: prefix.to_owned(),
            rank,
            size,
            message,
        };
        let c_prefix =
            CString::new(prefix).map_err(|_| failed("a NUL byte in the prefix".into()))?;
        let mut ptr = std::ptr::null_mut();
        let error = match backend {
            Backend::Gloo => {
                let interface = std::env::var("GLOO_SOCKET_IFNAME").unwrap_or_default();
                let c_interface = CString::new(interface)
                    .map_err(|_| failed("a NUL byte in GLOO_SOCKET_IFNAME".into()))?;
                // SAFETY: valid store handle, C strings and out pointer.
                unsafe {
                    ffi::seer_gloo_new(
                        store.ptr,
                        c_prefix.as_ptr(),
                        rank as i32,
                        size as i32,
                        millis(timeout),
                        c_interface.as_ptr(),
                        &mut ptr,
                    )
                }
            }
            // SAFETY: as above.
            Backend::Nccl => unsafe {
                ffi::seer_nccl_new(
                    store.ptr,
                    c_prefix.as_ptr(),
                    rank as i32,
                    size as i32,
                    millis(timeout),
                    &mut ptr,
                )
            },
        };
        take_error(error).map_err(failed)?;
        Ok(ProcessGroup {
            ptr,
            rank,
            size,
            backend,
            timeout,
            _store: Some(Arc::clone(store)),
        })
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The timeout of every operation.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Panics with a [`CollectiveFailure`] for `operation`, which libtorch reported as an error
    /// outside this group's own calls: SyncBatchNorm's all-reduces inside autograd's backward
    /// pass fail there when a peer died or hung.
    pub fn fail(&self, operation: &'static str, message: &str) -> ! {
        // c10d's message carries a C++ backtrace after its first line.
        let message = message.lines().next().unwrap_or_default().to_owned();
        std::panic::panic_any(CollectiveFailure(self.operation_error(operation, message)))
    }

    fn operation_error(&self, operation: &'static str, message: String) -> DistError {
        DistError::Operation {
            operation,
            rank: self.rank,
            size: self.size,
            timeout_s: self.timeout.as_secs_f64(),
            message,
        }
    }

    /// All-reduces `tensors` in place in one coalesced call. They must be contiguous, of one
    /// kind, on one device (this backend's).
    pub fn all_reduce(&self, tensors: &mut [Tensor], op: ReduceOp) -> Result<(), DistError> {
        if tensors.is_empty() {
            return Ok(());
        }
        let mut pointers: Vec<_> = tensors.iter_mut().map(|t| t.as_mut_ptr()).collect();
        let op = match op {
            ReduceOp::Sum => 0,
            ReduceOp::Max => 1,
        };
        // SAFETY: live tensor handles (`torch::Tensor*`) borrowed mutably for the call.
        let error =
            unsafe { ffi::seer_all_reduce(self.ptr, pointers.as_mut_ptr(), pointers.len(), op) };
        take_error(error).map_err(|m| self.operation_error("all-reduce", m))
    }

    /// Replaces `tensor` (contiguous) by rank `root`'s.
    pub fn broadcast_from(&self, tensor: &mut Tensor, root: usize) -> Result<(), DistError> {
        // SAFETY: a live tensor handle borrowed mutably for the call.
        let error = unsafe { ffi::seer_broadcast(self.ptr, tensor.as_mut_ptr(), root as i32) };
        take_error(error).map_err(|m| self.operation_error("broadcast", m))
    }

    /// Waits until every rank has reached the barrier.
    pub fn barrier(&self) -> Result<(), DistError> {
        // SAFETY: a live group handle.
        let error = unsafe { ffi::seer_barrier(self.ptr) };
        take_error(error).map_err(|m| self.operation_error("barrier", m))
    }

    /// Training-mode batch norm of `input` (`[N, C, ...]`) with its statistics summed over this
    /// group in forward and backward (`torch.nn.SyncBatchNorm`); updates the running statistics
    /// in place.
    #[allow(clippy::too_many_arguments)]
    pub fn sync_batch_norm(
        &self,
        input: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        running_mean: &Tensor,
        running_var: &Tensor,
        momentum: f64,
        eps: f64,
    ) -> Result<Tensor, DistError> {
        let mut input = input.shallow_clone();
        let (mut weight, mut bias) = (weight.shallow_clone(), bias.shallow_clone());
        let (mut mean, mut var) = (running_mean.shallow_clone(), running_var.shallow_clone());
        let mut out = std::ptr::null_mut();
        // SAFETY: live tensor handles for the call; on success the bridge writes a new
        // heap-allocated `torch::Tensor*` that the returned Tensor owns.
        let error = unsafe {
            ffi::seer_sync_batch_norm(
                self.ptr,
                input.as_mut_ptr(),
                weight.as_mut_ptr(),
                bias.as_mut_ptr(),
                mean.as_mut_ptr(),
                var.as_mut_ptr(),
                momentum,
                eps,
                &mut out,
            )
        };
        take_error(error).map_err(|m| self.operation_error("sync batch norm", m))?;
        // SAFETY: see above.
        Ok(unsafe { Tensor::from_ptr(out) })
    }

    fn or_fail<T>(&self, result: Result<T, DistError>) -> T {
        result.unwrap_or_else(|e| std::panic::panic_any(CollectiveFailure(e)))
    }

    /// Reduces `t` of any layout through a contiguous copy when needed.
    fn reduce_one(&self, t: &mut Tensor, op: ReduceOp) {
        if t.is_contiguous() {
            let mut tensors = [t.shallow_clone()];
            let result = self.all_reduce(&mut tensors, op);
            self.or_fail(result);
        } else {
            let mut tensors = [t.contiguous()];
            let result = self.all_reduce(&mut tensors, op);
            self.or_fail(result);
            t.copy_(&tensors[0]);
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: created by seer_gloo_new / seer_nccl_new, freed once.
        unsafe { ffi::seer_group_free(self.ptr) }
    }
}

impl Collective for ProcessGroup {
    fn world_size(&self) -> usize {
        self.size
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn all_reduce_sum(&self, t: &mut Tensor) {
        self.reduce_one(t, ReduceOp::Sum);
    }

    fn all_reduce_max(&self, t: &mut Tensor) {
        self.reduce_one(t, ReduceOp::Max);
    }

    fn broadcast(&self, t: &mut Tensor, root: usize) {
        if t.is_contiguous() {
            let result = self.broadcast_from(&mut t.shallow_clone(), root);
            self.or_fail(result);
        } else {
            let mut copy = t.contiguous();
            let result = self.broadcast_from(&mut copy, root);
            self.or_fail(result);
            t.copy_(&copy);
        }
    }

    fn all_reduce_sum_coalesced(&self, tensors: &mut [Tensor]) {
        if tensors.iter().all(|t| t.is_contiguous()) {
            let result = self.all_reduce(tensors, ReduceOp::Sum);
            self.or_fail(result);
        } else {
            for t in tensors {
                self.reduce_one(t, ReduceOp::Sum);
            }
        }
    }

    fn barrier(&self) {
        let result = ProcessGroup::barrier(self);
        self.or_fail(result);
    }
}

/// Averages gradients over the ranks of a [`Collective`] in buckets of about `bucket_bytes`:
/// each bucket's gradients are copied into one flat buffer, summed across ranks in one call,
/// divided by the world size, and copied back (one large all-reduce is far cheaper than many
/// small ones: docs/distributed.md has the measurements).
#[derive(Debug, Clone, Copy)]
pub struct GradientReducer {
    /// Target bucket size in bytes (a single larger gradient gets a bucket of its own).
    pub bucket_bytes: usize,
}

impl GradientReducer {
    /// Averages the gradients of `parameters` (those with one) in place; every rank must call
    /// it with the same parameters in the same order, with the same gradients defined.
    pub fn average(&self, parameters: &[(String, Tensor)], collective: &dyn Collective) {
        let world = collective.world_size();
        if world == 1 {
            return;
        }
        let grads: Vec<Tensor> = parameters
            .iter()
            .map(|(_, p)| p.grad())
            .filter(Tensor::defined)
            .collect();
        for bucket in buckets(&grads, self.bucket_bytes) {
            let members: Vec<&Tensor> = bucket.iter().map(|&i| &grads[i]).collect();
            let flat: Vec<Tensor> = members.iter().map(|g| g.reshape([-1])).collect();
            let mut buffer = [Tensor::cat(&flat, 0)];
            collective.all_reduce_sum_coalesced(&mut buffer);
            let [mut buffer] = buffer;
            buffer /= world as f64;
            let mut offset = 0;
            tch::no_grad(|| {
                for g in members {
                    let n = g.numel() as i64;
                    let mut g = g.shallow_clone();
                    g.copy_(&buffer.narrow(0, offset, n).view(g.size().as_slice()));
                    offset += n;
                }
            });
        }
    }
}

/// Groups tensors, in order, into runs of one kind and device of about `bucket_bytes` each.
fn buckets(tensors: &[Tensor], bucket_bytes: usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut current_bytes = 0;
    let mut current_key = None;
    for (i, t) in tensors.iter().enumerate() {
        let key = (t.kind(), t.device());
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        let fits = current_key == Some(key) && current_bytes + bytes <= bucket_bytes;
        match out.last_mut() {
            Some(last) if fits => {
                last.push(i);
                current_bytes += bytes;
            }
            _ => {
                out.push(vec![i]);
                current_bytes = bytes;
                current_key = Some(key);
            }
        }
    }
    out
}

/// The group SyncBatchNorm reduces over, when configured ([`set_sync_batch_norm_group`]).
static SYNC_BATCH_NORM: RwLock<Option<Arc<ProcessGroup>>> = RwLock::new(None);

/// Makes every training-mode batch norm of the model ([`batch_norm`]) synchronize its
/// statistics over `group` (`None`: local statistics, the default).
pub fn set_sync_batch_norm_group(group: Option<Arc<ProcessGroup>>) {
    *SYNC_BATCH_NORM
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = group;
}

/// The configured SyncBatchNorm group.
pub fn sync_batch_norm_group() -> Option<Arc<ProcessGroup>> {
    SYNC_BATCH_NORM
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

/// Batch norm as the model's layers run it: `torch.batch_norm` in evaluation or without a
/// SyncBatchNorm group, [`ProcessGroup::sync_batch_norm`] in training with one.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm(
    input: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    train: bool,
    momentum: f64,
    eps: f64,
) -> Tensor {
    if train && let Some(group) = sync_batch_norm_group() {
        let result = group.sync_batch_norm(
            input,
            weight,
            bias,
            running_mean,
            running_var,
            momentum,
            eps,
        );
        return group.or_fail(result);
    }
    input.batch_norm(
        Some(weight),
        Some(bias),
        Some(running_mean),
        Some(running_var),
        train,
        momentum,
        eps,
        true,
    )
}

/// Every rank's `bytes`, in rank order (an all-gather through sums: each rank fills its own
/// row of a zero matrix).
pub fn all_gather_bytes(bytes: &[u8], collective: &dyn Collective) -> Vec<Vec<u8>> {
    let world = collective.world_size();
    if world == 1 {
        return vec![bytes.to_vec()];
    }
    let mut length = Tensor::from_slice(&[bytes.len() as i64]);
    collective.all_reduce_max(&mut length);
    let longest = length.int64_value(&[0]);
    let mut lengths = Tensor::zeros([world as i64], (Kind::Int64, Device::Cpu));
    let _ = lengths
        .get(collective.rank() as i64)
        .fill_(bytes.len() as i64);
    let mut rows = Tensor::zeros([world as i64, longest.max(1)], (Kind::Int64, Device::Cpu));
    if !bytes.is_empty() {
        let values: Vec<i64> = bytes.iter().map(|&b| i64::from(b)).collect();
        rows.get(collective.rank() as i64)
            .narrow(0, 0, bytes.len() as i64)
            .copy_(&Tensor::from_slice(&values));
    }
    collective.all_reduce_sum(&mut lengths);
    collective.all_reduce_sum(&mut rows);
    (0..world as i64)
        .map(|r| {
            let n = lengths.int64_value(&[r]);
            let row = Vec::<i64>::try_from(rows.get(r).narrow(0, 0, n)).unwrap_or_default();
            row.into_iter().map(|v| v as u8).collect()
        })
        .collect()
}

/// Every rank's `tensor` (same shape on every rank) concatenated along `dim` in rank order.
pub fn all_gather_cat(tensor: &Tensor, dim: i64, collective: &dyn Collective) -> Tensor {
    let world = collective.world_size();
    if world == 1 {
        return tensor.shallow_clone();
    }
    let mut shape = vec![world as i64];
    shape.extend(tensor.size());
    let mut slots = Tensor::zeros(shape.as_slice(), (tensor.kind(), tensor.device()));
    slots.get(collective.rank() as i64).copy_(tensor);
    collective.all_reduce_sum(&mut slots);
    let parts: Vec<Tensor> = (0..world as i64).map(|r| slots.get(r)).collect();
    Tensor::cat(&parts, dim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinning_gives_a_pinned_copy_or_an_error_without_a_gpu() {
        let tensor = Tensor::arange(12, (Kind::Uint8, Device::Cpu)).view([3, 4]);
        match pinned(&tensor) {
            Ok(copy) => {
                assert!(tch::Cuda::is_available(), "pinned without a CUDA device");
                assert_eq!(copy.size(), [3, 4]);
                assert_eq!(copy.device(), Device::Cpu);
                assert!(copy.equal(&tensor));
            }
            // What libtorch says where no accelerator runtime is found; a message, no abort.
            Err(message) => {
                assert!(!tch::Cuda::is_available(), "{message}");
                assert!(!message.is_empty());
            }
        }
    }

    #[test]
    fn buckets_split_by_size_and_kind() {
        let f = |n: i64| Tensor::zeros([n], (Kind::Float, Device::Cpu));
        let d = |n: i64| Tensor::zeros([n], (Kind::Double, Device::Cpu));
        // 4-byte floats: 10, 10 fit in 100 bytes; 30 starts a new one; a double starts another.
        let tensors = [f(10), f(10), f(30), f(5), d(1), f(100)];
        assert_eq!(
            buckets(&tensors, 100),
            vec![vec![0, 1], vec![2], vec![3], vec![4], vec![5]]
        );
        assert_eq!(buckets(&tensors[..2], 1 << 20), vec![vec![0, 1]]);
    }
}

/// The process groups of one rank of a data-parallel run.
#[derive(Debug, Clone)]
pub struct Distributed {
    /// Every rank: gradients, Sinkhorn, metrics, checkpoint gathering.
    pub group: Arc<ProcessGroup>,
    /// This rank's SyncBatchNorm group, when configured.
    pub sync_bn: Option<Arc<ProcessGroup>>,
    /// Gradient bucketing.
    pub reducer: GradientReducer,
}

impl Distributed {
    /// Joins the run `launch` describes: connects to (or hosts) the store, creates the main
    /// group and, with `sync_bn_group_size` above 1, this rank's SyncBatchNorm group of
    /// consecutive ranks.
    pub fn init(
        launch: &crate::launch::Launch,
        backend: Backend,
        timeout: Duration,
        bucket_bytes: usize,
        sync_bn_group_size: usize,
    ) -> Result<Distributed, DistError> {
        let store = Arc::new(Store::connect(
            &launch.master_addr,
            launch.master_port,
            launch.hosts_store(),
            timeout,
        )?);
        let prefix = format!("seer/attempt_{}", launch.restart_count);
        let group = Arc::new(ProcessGroup::new(
            &store,
            &format!("{prefix}/main"),
            launch.rank,
            launch.world_size,
            backend,
            timeout,
        )?);
        let sync_bn = match sync_bn_group_size {
            0 | 1 => None,
            size if size == launch.world_size => Some(Arc::clone(&group)),
            size => {
                let index = launch.rank / size;
                Some(Arc::new(ProcessGroup::new(
                    &store,
                    &format!("{prefix}/sync_bn_{index}"),
                    launch.rank % size,
                    size,
                    backend,
                    timeout,
                )?))
            }
        };
        Ok(Distributed {
            group,
            sync_bn,
            reducer: GradientReducer { bucket_bytes },
        })
    }
}
