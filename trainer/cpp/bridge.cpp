// The trainer's bridge to PyTorch's distributed engine (c10d), which tch does not bind.
//
// A C ABI over c10d's TCPStore, PrefixStore, ProcessGroupGloo (and ProcessGroupNCCL with
// SEER_NCCL), and a synchronized batch norm as a custom autograd function. Tensors cross the
// boundary as `at::Tensor*` (what tch's `Tensor::as_mut_ptr` holds). Every function catches
// C++ exceptions and returns them as a message (malloc'd, freed with seer_free_error); a null
// message means success. Rust's side is trainer/src/dist.rs.

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef SEER_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace {

struct Store {
  c10::intrusive_ptr<c10d::Store> store;
};

struct Group {
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

char* error_message(const char* what) {
  char* copy = static_cast<char*>(std::malloc(std::strlen(what) + 1));
  if (copy != nullptr) {
    std::strcpy(copy, what);
  }
  return copy;
}

template <typename F>
char* guarded(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const c10::Error& e) {
    // c10's what() carries a C++ backtrace; the message alone is what a user needs.
    return error_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return error_message(e.what());
  } catch (...) {
    return error_message("unknown C++ exception");
  }
}

c10d::ReduceOp reduce_op(int op) {
  switch (op) {
    case 0:
      return c10d::ReduceOp::SUM;
    case 1:
      return c10d::ReduceOp::MAX;
    default:
      throw std::invalid_argument("unknown reduce operation " + std::to_string(op));
  }
}

void wait(Group* group, const c10::intrusive_ptr<c10d::Work>& work) {
  work->wait(group->timeout);
}

// SyncBatchNorm: training-mode batch norm whose statistics are summed over a process group,
// in forward (sum and sum of squares, in float64) and in backward (sum of the output gradient
// and of its product with the centered input), as torch.nn.SyncBatchNorm does.
struct SyncBatchNorm : public torch::autograd::Function<SyncBatchNorm> {
  static at::Tensor forward(
      torch::autograd::AutogradContext* ctx,
      const at::Tensor& input,
      const at::Tensor& weight,
      const at::Tensor& bias,
      at::Tensor running_mean,
      at::Tensor running_var,
      int64_t group_address,
      double momentum,
      double eps) {
    auto* group = reinterpret_cast<Group*>(group_address);
    const int64_t channels = input.size(1);
    std::vector<int64_t> dims{0};
    for (int64_t d = 2; d < input.dim(); ++d) {
      dims.push_back(d);
    }
    std::vector<int64_t> shape(input.dim(), 1);
    shape[1] = channels;
    const double local_count = static_cast<double>(input.numel() / channels);
    auto x = input.to(at::kDouble);
    // [2C + 1]: sums, sums of squares, count.
    auto stats = at::cat({x.sum(dims), (x * x).sum(dims),
                             at::full({1}, local_count, x.options())});
    std::vector<at::Tensor> tensors{stats};
    wait(group, group->backend->allreduce(tensors));
    const double count = stats[2 * channels].item<double>();
    auto mean = stats.slice(0, 0, channels) / count;
    auto var = (stats.slice(0, channels, 2 * channels) / count - mean * mean).clamp_min(0.0);
    auto invstd = (var + eps).rsqrt();
    {
      at::NoGradGuard no_grad;
      if (running_mean.defined()) {
        running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.scalar_type()), momentum);
      }
      if (running_var.defined()) {
        const double unbias = count > 1.0 ? count / (count - 1.0) : 1.0;
        running_var.mul_(1.0 - momentum)
            .add_((var * unbias).to(running_var.scalar_type()), momentum);
      }
    }
    auto mean_f = mean.to(input.scalar_type()).view(shape);
    auto invstd_f = invstd.to(input.scalar_type()).view(shape);
    auto output = (input - mean_f) * invstd_f * weight.view(shape) + bias.view(shape);
    ctx->save_for_backward({input, weight, mean_f, invstd_f});
    ctx->saved_data["group"] = group_address;
    ctx->saved_data["count"] = count;
    return output;
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx,
      torch::autograd::variable_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    auto input = saved[0];
    auto weight = saved[1];
    auto mean = saved[2];
    auto invstd = saved[3];
    auto* group = reinterpret_cast<Group*>(ctx->saved_data["group"].toInt());
    const double count = ctx->saved_data["count"].toDouble();
    auto grad_output = grad_outputs[0].contiguous();
    const int64_t channels = input.size(1);
    std::vector<int64_t> dims{0};
    for (int64_t d = 2; d < input.dim(); ++d) {
      dims.push_back(d);
    }
    std::vector<int64_t> shape(input.dim(), 1);
    shape[1] = channels;
    auto centered = input - mean;
    // Local sums: the weight's and bias's own gradients are local (data parallelism averages
    // them with every other gradient); the input's needs the group's sums.
    auto sum_dy = grad_output.sum(dims);
    auto sum_dy_centered = (grad_output * centered).sum(dims);
    auto grad_weight = sum_dy_centered * invstd.view({channels});
    auto grad_bias = sum_dy;
    auto stats = at::cat({sum_dy, sum_dy_centered}).to(at::kDouble);
    std::vector<at::Tensor> tensors{stats};
    wait(group, group->backend->allreduce(tensors));
    auto mean_dy = (stats.slice(0, 0, channels) / count).to(input.scalar_type()).view(shape);
    auto mean_dy_centered =
        (stats.slice(0, channels, 2 * channels) / count).to(input.scalar_type()).view(shape);
    auto grad_input = (grad_output - mean_dy - centered * invstd * invstd * mean_dy_centered) *
                      invstd * weight.view(shape);
    return {grad_input, grad_weight, grad_bias, at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

extern "C" {

void seer_free_error(char* message) { std::free(message); }

// Connects to (or, with is_server, hosts) the TCPStore at host:port, waiting up to timeout_ms
// for the server and, on the server, for world_size workers.
char* seer_store_new(const char* host, uint16_t port, bool is_server, int64_t world_size,
                     int64_t timeout_ms, Store** out) {
  return guarded([&] {
    c10d::TCPStoreOptions options;
    options.port = port;
    options.isServer = is_server;
    options.numWorkers = std::nullopt;
    options.waitWorkers = false;
    options.timeout = std::chrono::milliseconds(timeout_ms);
    (void)world_size;
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), options);
    *out = new Store{store};
  });
}

void seer_store_free(Store* store) { delete store; }

// A Gloo process group of `size` ranks under `prefix` in the store. interface: the network
// interface to use (GLOO_SOCKET_IFNAME), or null for the host name's address.
char* seer_gloo_new(Store* store, const char* prefix, int rank, int size, int64_t timeout_ms,
                    const char* interface, Group** out) {
  return guarded([&] {
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), store->store);
    auto timeout = std::chrono::milliseconds(timeout_ms);
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    if (interface != nullptr && interface[0] != '\0') {
      options->devices.push_back(
          c10d::ProcessGroupGloo::createDeviceForInterface(std::string(interface)));
    } else {
      options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    auto backend = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, rank, size, options);
    *out = new Group{backend, timeout};
  });
}

// An NCCL process group (the current CUDA device must be this rank's GPU).
char* seer_nccl_new(Store* store, const char* prefix, int rank, int size, int64_t timeout_ms,
                    Group** out) {
#ifdef SEER_NCCL
  return guarded([&] {
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), store->store);
    auto timeout = std::chrono::milliseconds(timeout_ms);
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = timeout;
    auto backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, rank, size, options);
    *out = new Group{backend, timeout};
  });
#else
  (void)store;
  (void)prefix;
  (void)rank;
  (void)size;
  (void)timeout_ms;
  (void)out;
  return error_message(
      "this trainer was built without NCCL: rebuild with `cargo build --features nccl`");
#endif
}

void seer_group_free(Group* group) { delete group; }

// All-reduces n tensors in place in one coalesced call (op 0: sum, 1: max). Gloo's coalesced
// all-reduce needs tensors of one kind and device.
char* seer_all_reduce(Group* group, at::Tensor** tensors, size_t n, int op) {
  return guarded([&] {
    c10d::AllreduceCoalescedOptions options;
    options.reduceOp = reduce_op(op);
    options.timeout = group->timeout;
    std::vector<at::Tensor> list;
    for (size_t i = 0; i < n; ++i) {
      list.push_back(*tensors[i]);
    }
    if (list.size() == 1) {
      c10d::AllreduceOptions single;
      single.reduceOp = options.reduceOp;
      single.timeout = options.timeout;
      wait(group, group->backend->allreduce(list, single));
    } else {
      wait(group, group->backend->allreduce_coalesced(list, options));
    }
  });
}

char* seer_broadcast(Group* group, at::Tensor* tensor, int root) {
  return guarded([&] {
    c10d::BroadcastOptions options;
    options.rootRank = root;
    options.timeout = group->timeout;
    std::vector<at::Tensor> list{*tensor};
    wait(group, group->backend->broadcast(list, options));
  });
}

char* seer_barrier(Group* group) {
  return guarded([&] {
    c10d::BarrierOptions options;
    options.timeout = group->timeout;
    wait(group, group->backend->barrier(options));
  });
}

// Training-mode batch norm of `input` ([N, C, ...]) with statistics over `group`; running
// statistics (may be undefined tensors) are updated in place. Writes a new tensor to *out.
char* seer_sync_batch_norm(Group* group, at::Tensor* input, at::Tensor* weight,
                           at::Tensor* bias, at::Tensor* running_mean,
                           at::Tensor* running_var, double momentum, double eps,
                           at::Tensor** out) {
  return guarded([&] {
    auto output = SyncBatchNorm::apply(*input, *weight, *bias, *running_mean, *running_var,
                                       reinterpret_cast<int64_t>(group), momentum, eps);
    *out = new at::Tensor(output);
  });
}

// A pinned (page-locked) copy of a CPU tensor, for asynchronous copies to the current
// accelerator. tch's `pin_memory` passes a device, an argument libtorch 2.11 deprecates with a
// warning on every call; this names none, which pins for the current accelerator.
char* seer_pin_memory(at::Tensor* tensor, at::Tensor** out) {
  return guarded([&] { *out = new at::Tensor(tensor->pin_memory()); });
}

}  // extern "C"
