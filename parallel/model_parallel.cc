// Autograd functions over Communicator collectives.
#include "parallel/model_parallel.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>

#include <string>

namespace lathe::parallel {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

ElemType TypeOf(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ElemType::kFloat32;
    case at::kDouble: return ElemType::kFloat64;
    case at::kInt: return ElemType::kInt32;
    case at::kLong: return ElemType::kInt64;
    default: TORCH_CHECK(false, "collective on unsupported dtype ", t.scalar_type());
  }
}

Buffer BufferOf(const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), "collective on a non-contiguous tensor");
  return {t.data_ptr(), t.numel(), TypeOf(t), t.is_cuda()};
}

void Check(const absl::Status& s) {
  TORCH_CHECK(s.ok(), "collective failed: ", std::string(s.ToString()));
}

// Holds the group between forward and backward (ctx->saved_data takes IValues).
struct GroupHolder : torch::CustomClassHolder {
  Group group;
  std::vector<int64_t> a, b;
};

c10::IValue Hold(const Group& g, std::vector<int64_t> a = {}, std::vector<int64_t> b = {}) {
  auto h = c10::make_intrusive<GroupHolder>();
  h->group = g;
  h->a = std::move(a);
  h->b = std::move(b);
  return c10::IValue::make_capsule(std::move(h));
}

GroupHolder& Held(AutogradContext* ctx) {
  return *static_cast<GroupHolder*>(ctx->saved_data["g"].toCapsule().get());
}

at::Tensor Summed(const at::Tensor& x, const Group& g) {
  at::Tensor y = x.contiguous().clone();
  AllReduceSumInPlace(y, g);
  return y;
}

// Communicators carry no bf16 (MPI has no such type): a bf16 tensor travels
// as fp32, which is exact for data movement; a sum is then taken in fp32 and
// rounded to bf16 once.
bool Narrow(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16; }

// All-gather of balanced row parts: `x` is this member's part of `total` rows.
at::Tensor GatherParts(const at::Tensor& x, int64_t total, const Group& g) {
  if (Narrow(x)) return GatherParts(x.to(at::kFloat), total, g).to(x.scalar_type());
  const int n = g.size();
  int64_t widest = 0;
  for (int i = 0; i < n; ++i) widest = std::max(widest, PartBegin(total, n, i + 1) - PartBegin(total, n, i));
  std::vector<int64_t> shape = x.sizes().vec();
  shape[0] = widest;
  at::Tensor padded = at::zeros(shape, x.options());
  padded.narrow(0, 0, x.size(0)).copy_(x);
  shape[0] = widest * n;
  at::Tensor all = at::empty(shape, x.options());
  Check(g.comm->AllGather(BufferOf(padded), BufferOf(all), g.timeout));
  std::vector<at::Tensor> parts;
  for (int i = 0; i < n; ++i) {
    parts.push_back(all.narrow(0, i * widest, PartBegin(total, n, i + 1) - PartBegin(total, n, i)));
  }
  return at::cat(parts, 0);
}

at::Tensor MyPart(const at::Tensor& x, const Group& g) {
  const int64_t b = PartBegin(x.size(0), g.size(), g.rank());
  return x.narrow(0, b, PartBegin(x.size(0), g.size(), g.rank() + 1) - b);
}

struct CopyFn : torch::autograd::Function<CopyFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, c10::IValue held) {
    ctx->saved_data["g"] = held;
    return x.view_as(x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {Summed(grads[0], Held(ctx).group), at::Tensor()};
  }
};

struct ReduceFn : torch::autograd::Function<ReduceFn> {
  static at::Tensor forward(AutogradContext*, const at::Tensor& x, c10::IValue held) {
    return Summed(x, static_cast<GroupHolder*>(held.toCapsule().get())->group);
  }
  static variable_list backward(AutogradContext*, variable_list grads) { return {grads[0], at::Tensor()}; }
};

struct ScatterFn : torch::autograd::Function<ScatterFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, c10::IValue held) {
    ctx->saved_data["g"] = held;
    ctx->saved_data["rows"] = x.size(0);
    return MyPart(x, Held(ctx).group).clone();
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {GatherParts(grads[0].contiguous(), ctx->saved_data["rows"].toInt(), Held(ctx).group), at::Tensor()};
  }
};

struct GatherFn : torch::autograd::Function<GatherFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t total, c10::IValue held) {
    ctx->saved_data["g"] = held;
    return GatherParts(x.contiguous(), total, Held(ctx).group);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {MyPart(grads[0], Held(ctx).group).clone(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor ExchangeRows(const at::Tensor& x, const std::vector<int64_t>& send_rows,
                        const std::vector<int64_t>& recv_rows, const Group& g) {
  if (Narrow(x)) return ExchangeRows(x.to(at::kFloat), send_rows, recv_rows, g).to(x.scalar_type());
  int64_t cols = 1;
  for (int64_t d = 1; d < x.dim(); ++d) cols *= x.size(d);
  std::vector<int64_t> sc, rc;
  int64_t total = 0;
  for (int64_t r : send_rows) sc.push_back(r * cols);
  for (int64_t r : recv_rows) {
    rc.push_back(r * cols);
    total += r;
  }
  std::vector<int64_t> shape = x.sizes().vec();
  shape[0] = total;
  at::Tensor out = at::empty(shape, x.options());
  at::Tensor in = x.contiguous();
  Check(g.comm->AllToAll(BufferOf(in), sc, BufferOf(out), rc, g.timeout));
  return out;
}

struct AllToAllFn : torch::autograd::Function<AllToAllFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, c10::IValue held) {
    ctx->saved_data["g"] = held;
    GroupHolder& h = Held(ctx);
    return ExchangeRows(x, h.a, h.b, h.group);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    GroupHolder& h = Held(ctx);
    return {ExchangeRows(grads[0], h.b, h.a, h.group), at::Tensor()};
  }
};

// See VocabParallelLogprobs. Saves the local softmax [N, Vl] for the backward.
struct VocabLogprobFn : torch::autograd::Function<VocabLogprobFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& index,
                            int64_t vocab_begin, c10::IValue held) {
    const Group& g = static_cast<GroupHolder*>(held.toCapsule().get())->group;
    const int64_t n = logits.size(0), vl = logits.size(1);
    at::Tensor top = vl > 0 ? std::get<0>(logits.max(1)) : at::full({n}, -INFINITY, logits.options());
    top = top.contiguous();
    AllReduceMaxInPlace(top, g);
    at::Tensor e = at::exp(logits - top.unsqueeze(1));
    at::Tensor sum = e.sum(1).contiguous();
    AllReduceSumInPlace(sum, g);
    at::Tensor log_z = top + at::log(sum);
    at::Tensor local = index - vocab_begin;
    at::Tensor mine = local.ge(0).logical_and(local.lt(vl));
    at::Tensor safe = local.masked_fill(mine.logical_not(), 0);
    at::Tensor target = vl > 0 ? logits.gather(1, safe).masked_fill(mine.logical_not(), 0.0)
                               : at::zeros(index.sizes(), logits.options());
    target = target.contiguous();
    AllReduceSumInPlace(target, g);
    ctx->save_for_backward({e.div_(sum.unsqueeze(1)), safe, mine});
    return target - log_z.unsqueeze(1);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    at::Tensor g = grads[0];
    at::Tensor grad = saved[0].mul(-g.sum(1, /*keepdim=*/true));
    grad.scatter_add_(1, saved[1], g.masked_fill(saved[2].logical_not(), 0.0));
    return {grad, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

int64_t PartBegin(int64_t total, int parts, int i) { return total * i / parts; }

void AllReduceSumInPlace(at::Tensor& t, const Group& g) {
  if (!g.active() || t.numel() == 0) return;
  if (Narrow(t)) {
    at::Tensor wide = t.to(at::kFloat);
    AllReduceSumInPlace(wide, g);
    t.copy_(wide);
    return;
  }
  Check(g.comm->AllReduceSum(BufferOf(t), g.timeout));
}

void AllReduceMaxInPlace(at::Tensor& t, const Group& g) {
  if (!g.active() || t.numel() == 0) return;
  if (Narrow(t)) {
    at::Tensor wide = t.to(at::kFloat);
    AllReduceMaxInPlace(wide, g);
    t.copy_(wide);
    return;
  }
  Check(g.comm->AllReduceMax(BufferOf(t), g.timeout));
}

bool AllAgree(bool mine, const Group& g) {
  at::Tensor dissent = at::scalar_tensor(mine ? 0 : 1, at::kLong).reshape({1});
  AllReduceMaxInPlace(dissent, g);
  return dissent.item<int64_t>() == 0;
}

at::Tensor AllToAllFlat(const at::Tensor& x, const std::vector<int64_t>& send_counts,
                        const std::vector<int64_t>& recv_counts, const Group& g) {
  if (!g.active()) return x.clone();
  return ExchangeRows(x.reshape({-1}), send_counts, recv_counts, g);
}

at::Tensor CopyToGroup(const at::Tensor& x, const Group& g) {
  if (!g.active()) return x;
  return CopyFn::apply(x, Hold(g));
}

at::Tensor ReduceFromGroup(const at::Tensor& x, const Group& g) {
  if (!g.active()) return x;
  return ReduceFn::apply(x, Hold(g));
}

at::Tensor ScatterRows(const at::Tensor& x, const Group& g) {
  if (!g.active()) return x;
  return ScatterFn::apply(x, Hold(g));
}

at::Tensor GatherRows(const at::Tensor& x, int64_t total_rows, const Group& g) {
  if (!g.active()) return x;
  return GatherFn::apply(x, total_rows, Hold(g));
}

at::Tensor AllToAllRows(const at::Tensor& x, const std::vector<int64_t>& send_rows,
                        const std::vector<int64_t>& recv_rows, const Group& g) {
  if (!g.active()) return x;
  return AllToAllFn::apply(x, Hold(g, send_rows, recv_rows));
}

at::Tensor VocabParallelLogprobs(const at::Tensor& logits, const at::Tensor& index, int64_t vocab_begin,
                                 const Group& g) {
  return VocabLogprobFn::apply(logits, index, vocab_begin, Hold(g));
}

}  // namespace lathe::parallel
