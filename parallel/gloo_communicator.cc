// The Gloo backend of Communicator: a full mesh of TCP pairs, formed through
// the deployment's rendezvous store, running Gloo's collectives with unbound
// buffers and a timeout each.
#include "parallel/gloo_communicator.h"

#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/alltoallv.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/common/error.h>
#include <gloo/math.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>

#include <dlfcn.h>
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <mutex>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace lathe::parallel {
namespace {

// Gloo's store interface over lathe's: keys scoped by generation and group.
// Gloo reports store failures as exceptions; the Status that caused the last
// one is kept so the caller sees its code (an over generation stays
// FailedPrecondition, not a generic I/O error).
class StoreAdapter : public gloo::rendezvous::Store {
 public:
  StoreAdapter(RendezvousStore* store, int64_t generation, std::string group, absl::Time deadline)
      : store_(store), generation_(generation), group_(std::move(group)), deadline_(deadline) {}

  void set(const std::string& key, const std::vector<char>& data) override {
    Check(store_->Set(generation_, Key(key), std::string(data.begin(), data.end())));
  }
  std::vector<char> get(const std::string& key) override {
    auto values = store_->Get(generation_, {Key(key)}, Remaining());
    Check(values.status());
    return std::vector<char>(values->front().begin(), values->front().end());
  }
  void wait(const std::vector<std::string>& keys) override { wait(keys, std::chrono::milliseconds(0)); }
  void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& /*timeout*/) override {
    // Gloo passes the context's timeout; the deadline of the whole formation
    // is the one that counts.
    std::vector<std::string> scoped;
    for (const std::string& k : keys) scoped.push_back(Key(k));
    Check(store_->Get(generation_, scoped, Remaining()).status());
  }
  const absl::Status& error() const { return error_; }

 private:
  std::string Key(const std::string& key) const { return absl::StrCat(group_, "/", key); }
  absl::Duration Remaining() const { return std::max(deadline_ - absl::Now(), absl::ZeroDuration()); }
  void Check(const absl::Status& s) {
    if (s.ok()) return;
    error_ = s;
    throw gloo::IoException(std::string(s.message()));
  }

  RendezvousStore* store_;
  const int64_t generation_;
  const std::string group_;
  const absl::Time deadline_;
  absl::Status error_;
};

size_t ElemSize(ElemType t) {
  switch (t) {
    case ElemType::kFloat32: return sizeof(float);
    case ElemType::kFloat64: return sizeof(double);
    case ElemType::kInt32: return sizeof(int32_t);
    case ElemType::kInt64: return sizeof(int64_t);
  }
  return 1;
}

// Calls f(T{}) with the C++ type of `t`.
template <typename F>
void WithType(ElemType t, F&& f) {
  switch (t) {
    case ElemType::kFloat32: return f(float{});
    case ElemType::kFloat64: return f(double{});
    case ElemType::kInt32: return f(int32_t{});
    case ElemType::kInt64: return f(int64_t{});
  }
}

// Gloo words its timeouts "Timed out ..." (transport) or "timed out" (store).
bool TimedOut(const char* what) { return absl::StrContains(absl::AsciiStrToLower(what), "timed out"); }

std::chrono::milliseconds Millis(absl::Duration d) {
  return std::chrono::milliseconds(std::max<int64_t>(1, absl::ToInt64Milliseconds(d)));
}

absl::Status SizeError(const char* what, int64_t got, int64_t want) {
  return absl::InvalidArgumentError(absl::StrCat(what, ": buffer holds ", got, " elements, needs ", want));
}

class GlooCommunicator : public Communicator {
 public:
  GlooCommunicator(std::shared_ptr<gloo::Context> context, int64_t generation)
      : context_(std::move(context)), generation_(generation) {}
  int rank() const override { return context_->rank; }
  int size() const override { return context_->size; }

  absl::Status AllReduceSum(Buffer buf, absl::Duration timeout) override {
    return AllReduce(buf, /*max=*/false, timeout, "all_reduce");
  }
  absl::Status AllReduceMax(Buffer buf, absl::Duration timeout) override {
    return AllReduce(buf, /*max=*/true, timeout, "all_reduce_max");
  }
  absl::Status AllGather(Buffer send, Buffer recv, absl::Duration timeout) override {
    if (absl::Status s = Usable("all_gather", send, recv); !s.ok()) return s;
    if (recv.count != send.count * size()) return SizeError("all_gather", recv.count, send.count * size());
    // Nothing to move (Gloo's all-gather divides by the size); every member
    // has the same count, so all skip it alike.
    if (send.count == 0) return absl::OkStatus();
    return Run("all_gather", timeout, [&](uint32_t tag, std::chrono::milliseconds ms) {
      WithType(send.type, [&](auto zero) {
        using T = decltype(zero);
        gloo::AllgatherOptions opts(context_);
        opts.setInput(static_cast<T*>(send.data), send.count);
        opts.setOutput(static_cast<T*>(recv.data), recv.count);
        opts.setTag(tag);
        opts.setTimeout(ms);
        gloo::allgather(opts);
      });
    });
  }
  absl::Status ReduceScatterSum(Buffer send, Buffer recv, absl::Duration timeout) override {
    if (absl::Status s = Usable("reduce_scatter", send, recv); !s.ok()) return s;
    if (send.count != recv.count * size()) return SizeError("reduce_scatter", send.count, recv.count * size());
    const size_t bytes = ElemSize(send.type);
    std::vector<char> scratch(static_cast<const char*>(send.data),
                              static_cast<const char*>(send.data) + send.count * bytes);
    Buffer whole{scratch.data(), send.count, send.type, false};
    if (absl::Status s = AllReduce(whole, /*max=*/false, timeout, "reduce_scatter"); !s.ok()) return s;
    std::memcpy(recv.data, scratch.data() + rank() * recv.count * bytes, recv.count * bytes);
    return absl::OkStatus();
  }
  absl::Status AllToAll(Buffer send, const std::vector<int64_t>& send_counts, Buffer recv,
                        const std::vector<int64_t>& recv_counts, absl::Duration timeout) override;
  absl::Status Broadcast(Buffer buf, int root, absl::Duration timeout) override {
    if (absl::Status s = Usable("broadcast", buf, buf); !s.ok()) return s;
    if (root < 0 || root >= size()) return absl::InvalidArgumentError(absl::StrCat("broadcast root ", root));
    if (buf.count == 0) return absl::OkStatus();  // as all_gather
    return Run("broadcast", timeout, [&](uint32_t tag, std::chrono::milliseconds ms) {
      WithType(buf.type, [&](auto zero) {
        using T = decltype(zero);
        gloo::BroadcastOptions opts(context_);
        opts.setOutput(static_cast<T*>(buf.data), buf.count);
        opts.setRoot(root);
        opts.setTag(tag);
        opts.setTimeout(ms);
        gloo::broadcast(opts);
      });
    });
  }
  absl::Status Barrier(absl::Duration timeout) override {
    if (broken_) return Broken();
    return Run("barrier", timeout, [&](uint32_t tag, std::chrono::milliseconds ms) {
      gloo::BarrierOptions opts(context_);
      opts.setTag(tag);
      opts.setTimeout(ms);
      gloo::barrier(opts);
    });
  }

 private:
  absl::Status AllReduce(Buffer buf, bool max, absl::Duration timeout, const char* what) {
    if (absl::Status s = Usable(what, buf, buf); !s.ok()) return s;
    if (buf.count == 0) return absl::OkStatus();  // as all_gather
    return Run(what, timeout, [&](uint32_t tag, std::chrono::milliseconds ms) {
      WithType(buf.type, [&](auto zero) {
        using T = decltype(zero);
        gloo::AllreduceOptions opts(context_);
        opts.setOutput(static_cast<T*>(buf.data), buf.count);  // no input: in place
        using Fn = void (*)(void*, const void*, const void*, size_t);
        opts.setReduceFunction(max ? static_cast<Fn>(&gloo::max<T>) : static_cast<Fn>(&gloo::sum<T>));
        opts.setTag(tag);
        opts.setTimeout(ms);
        gloo::allreduce(opts);
      });
    });
  }

  absl::Status Usable(const char* what, const Buffer& a, const Buffer& b) const {
    if (broken_) return Broken();
    if (a.device || b.device) {
      return absl::FailedPreconditionError(
          absl::StrCat(what, " on a CUDA buffer reached the Gloo backend (host only)"));
    }
    if (a.type != b.type) return absl::InvalidArgumentError(absl::StrCat(what, ": send and receive types differ"));
    if (a.count < 0 || b.count < 0) return absl::InvalidArgumentError(absl::StrCat(what, ": negative count"));
    return absl::OkStatus();
  }
  absl::Status Broken() const {
    return absl::FailedPreconditionError(absl::StrCat("Gloo communicator of generation ", generation_,
                                                      " is broken by an earlier failure: ", broken_why_));
  }

  // Runs one collective under the next tag (every member counts the same
  // calls); a Gloo failure breaks the communicator.
  template <typename F>
  absl::Status Run(const char* what, absl::Duration timeout, F&& body) {
    if (broken_) return Broken();
    const uint32_t tag = next_tag_++;
    try {
      body(tag, Millis(timeout));
      return absl::OkStatus();
    } catch (const std::exception& e) {
      broken_ = true;
      const bool timed_out = TimedOut(e.what());
      broken_why_ = absl::StrCat(what, " on rank ", rank(), " of ", size(), " (generation ", generation_,
                                 timed_out ? ") timed out after " : ") lost a peer: ",
                                 timed_out ? absl::FormatDuration(timeout) : "", timed_out ? ": " : "", e.what());
      return timed_out ? absl::DeadlineExceededError(broken_why_) : absl::UnavailableError(broken_why_);
    }
  }

  std::shared_ptr<gloo::Context> context_;
  const int64_t generation_;
  uint32_t next_tag_ = 0;
  bool broken_ = false;
  std::string broken_why_;
};

absl::Status GlooCommunicator::AllToAll(Buffer send, const std::vector<int64_t>& send_counts, Buffer recv,
                                        const std::vector<int64_t>& recv_counts, absl::Duration timeout) {
  if (absl::Status s = Usable("all_to_all", send, recv); !s.ok()) return s;
  const size_t n = static_cast<size_t>(size());
  if (send_counts.size() != n || recv_counts.size() != n) {
    return absl::InvalidArgumentError(absl::StrCat("all_to_all: ", send_counts.size(), " send and ",
                                                   recv_counts.size(), " recv counts for ", n, " members"));
  }
  int64_t send_total = 0, recv_total = 0;
  for (size_t i = 0; i < n; ++i) {
    if (send_counts[i] < 0 || recv_counts[i] < 0) return absl::InvalidArgumentError("all_to_all: negative count");
    send_total += send_counts[i];
    recv_total += recv_counts[i];
  }
  if (send_total > send.count) return SizeError("all_to_all send", send.count, send_total);
  if (recv_total > recv.count) return SizeError("all_to_all recv", recv.count, recv_total);
  return Run("all_to_all", timeout, [&](uint32_t tag, std::chrono::milliseconds ms) {
    WithType(send.type, [&](auto zero) {
      using T = decltype(zero);
      gloo::AlltoallvOptions opts(context_);
      opts.setInput(static_cast<T*>(send.data), send_counts);
      opts.setOutput(static_cast<T*>(recv.data), recv_counts);
      opts.setTag(tag);
      opts.setTimeout(ms);
      gloo::alltoallv(opts);
    });
  });
}

// Gloo's TCP pairs write with plain writev: a write to a peer that died
// would raise SIGPIPE and kill this process instead of failing the
// collective. Ignored unless the program installed a handler of its own.
void IgnoreSigpipe() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction current {};
    if (sigaction(SIGPIPE, nullptr, &current) == 0 && current.sa_handler == SIG_DFL) {
      signal(SIGPIPE, SIG_IGN);
    }
  });
}

// libtorch_cpu.so exports its own, newer Gloo under the same names and
// different layouts. In a process that loads both, every gloo:: symbol binds
// to whichever library comes first in the global lookup order; the Gloo this
// file was compiled against (Debian's libgloo.so) must win, or the first
// collective corrupts memory. The check: gloo::allreduce resolves into the
// object that defines connectFullMesh(Store&, ...), which only that Gloo has
// (libtorch's takes a shared_ptr<Store>).
absl::Status CheckGlooBinding() {
  static const absl::Status status = [] {
    constexpr char kOwnSymbol[] =
        "_ZN4gloo10rendezvous7Context15connectFullMeshERNS0_5StoreERSt10shared_ptrINS_9transport6DeviceEE";
    void* own = dlsym(RTLD_DEFAULT, kOwnSymbol);
    Dl_info own_info{}, used_info{};
    if (own == nullptr || dladdr(own, &own_info) == 0 ||
        dladdr(reinterpret_cast<void*>(&gloo::allreduce), &used_info) == 0) {
      return absl::OkStatus();  // statically linked or stripped: nothing to compare
    }
    if (own_info.dli_fbase == used_info.dli_fbase) return absl::OkStatus();
    return absl::FailedPreconditionError(absl::StrCat(
        "gloo::allreduce binds to ", used_info.dli_fname, " instead of the Gloo lathe was built against (",
        own_info.dli_fname, "): link libgloo before libtorch (docs/build-and-dependencies.md, \"Gloo\")"));
  }();
  return status;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Communicator>> MakeGlooCommunicator(const StoreGroupOptions& options,
                                                                   RendezvousStore* store) {
  if (absl::Status s = ValidateStoreGroupOptions(options); !s.ok()) return s;
  if (absl::Status s = CheckGlooBinding(); !s.ok()) return s;
  IgnoreSigpipe();
  StoreAdapter adapter(store, options.generation, options.group, absl::Now() + options.connect_timeout);
  const std::string where = absl::StrCat("forming Gloo group ", options.group, " of generation ",
                                         options.generation, " (rank ", options.rank, " of ", options.size, ")");
  try {
    gloo::transport::tcp::attr attr;
    attr.hostname = options.hostname;
    std::shared_ptr<gloo::transport::Device> device = gloo::transport::tcp::CreateDevice(attr);
    auto context = std::make_shared<gloo::rendezvous::Context>(options.rank, options.size);
    context->setTimeout(Millis(options.connect_timeout));
    context->connectFullMesh(adapter, device);
    return std::unique_ptr<Communicator>(new GlooCommunicator(std::move(context), options.generation));
  } catch (const std::exception& e) {
    if (!adapter.error().ok()) {
      return absl::Status(adapter.error().code(), absl::StrCat(where, ": ", adapter.error().message()));
    }
    const bool timed_out = TimedOut(e.what());
    const std::string message = absl::StrCat(where, ": ", e.what());
    return timed_out ? absl::DeadlineExceededError(message) : absl::UnavailableError(message);
  }
}

}  // namespace lathe::parallel
