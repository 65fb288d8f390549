// GatedDeltaNet's own consistency: packed sequences equal separate calls, a prefill plus
// single steps from per-sequence states equals one pass, single-token steps are batch- and
// thread-invariant, every parameter gets a gradient,
// column views of a fused projection work, and bad shapes are refused naming the argument. (Parity with transformers:
// tests/parity/test_gated_delta_net.py.)
#include "tensor/gated_delta_net.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <string>
#include <vector>

namespace lathe::runtime {
namespace {

GdnDims Dims() {
  GdnDims d;
  d.num_k_heads = 2;
  d.num_v_heads = 4;
  d.head_k_dim = 8;
  d.head_v_dim = 6;
  return d;
}

GdnWeights RandomWeights(const GdnDims& d) {
  return {at::randn({d.conv_dim(), 1, d.conv_kernel}) * 0.5, at::rand({d.num_v_heads}) * 2.0,
          at::randn({d.num_v_heads}), 1.0 + 0.2 * at::randn({d.head_v_dim})};
}

GdnInputs RandomInputs(const GdnDims& d, int64_t t) {
  return {at::randn({t, d.conv_dim()}), at::randn({t, d.value_dim()}), at::randn({t, d.num_v_heads}),
          at::randn({t, d.num_v_heads})};
}

GdnInputs Rows(const GdnInputs& in, int64_t start, int64_t n) {
  return {in.qkv.narrow(0, start, n), in.z.narrow(0, start, n), in.b.narrow(0, start, n), in.a.narrow(0, start, n)};
}

double MaxDiff(const at::Tensor& x, const at::Tensor& y) { return (x - y).abs().max().item<double>(); }

// Max abs difference relative to max(1, max |want|).
double RelDiff(const at::Tensor& got, const at::Tensor& want) {
  return MaxDiff(got, want) / std::max(1.0, want.abs().max().item<double>());
}

TEST(GatedDeltaNetTest, PackedSequencesEqualSeparateCalls) {
  at::manual_seed(1);
  const GdnDims d = Dims();
  const GdnWeights w = RandomWeights(d);
  const std::vector<int64_t> lengths = {1, 64, 65, 2, 129, 1};
  const GdnInputs in = RandomInputs(d, 262);
  const at::Tensor packed = GatedDeltaNet(d, w, in, lengths);
  int64_t start = 0;
  for (int64_t len : lengths) {
    const at::Tensor alone = GatedDeltaNet(d, w, Rows(in, start, len), {len});
    EXPECT_LT(RelDiff(packed.narrow(0, start, len), alone), 1e-5) << "sequence of " << len << " at " << start;
    start += len;
  }
  // One sequence over the same rows is a different computation: the boundaries matter.
  EXPECT_GT(MaxDiff(GatedDeltaNet(d, w, in, {262}).narrow(0, 1, 64), packed.narrow(0, 1, 64)), 1e-3);
}

TEST(GatedDeltaNetTest, PrefillThenSingleStepsEqualsOnePass) {
  at::manual_seed(2);
  const GdnDims d = Dims();
  const GdnWeights w = RandomWeights(d);
  const std::vector<int64_t> lengths = {70, 3, 130}, prefill = {65, 1, 64};
  const GdnInputs in = RandomInputs(d, 203);
  const at::Tensor whole = GatedDeltaNet(d, w, in, lengths);
  const std::vector<int64_t> start = {0, 70, 73};
  std::vector<GdnState> states;
  for (size_t s = 0; s < lengths.size(); ++s) {
    std::vector<GdnState> one = {GdnInitialState(d, in.qkv)};
    const at::Tensor out = GatedDeltaNet(d, w, Rows(in, start[s], prefill[s]), {prefill[s]}, &one);
    EXPECT_LT(RelDiff(out, whole.narrow(0, start[s], prefill[s])), 1e-5) << "prefill of sequence " << s;
    states.push_back(one[0]);
  }
  for (int64_t p = 1;; ++p) {  // every sequence with tokens left advances by one, together
    std::vector<int64_t> seqs, ones;
    std::vector<GdnState> step;
    std::vector<at::Tensor> rows;
    for (size_t s = 0; s < lengths.size(); ++s) {
      if (prefill[s] + p > lengths[s]) continue;
      seqs.push_back(s);
      ones.push_back(1);
      step.push_back(states[s]);
      rows.push_back(at::arange(start[s] + prefill[s] + p - 1, start[s] + prefill[s] + p));
    }
    if (seqs.empty()) break;
    const at::Tensor index = at::cat(rows);
    const GdnInputs step_in = {in.qkv.index_select(0, index), in.z.index_select(0, index),
                               in.b.index_select(0, index), in.a.index_select(0, index)};
    const at::Tensor out = GatedDeltaNet(d, w, step_in, ones, &step);
    EXPECT_LT(RelDiff(out, whole.index_select(0, index)), 1e-5) << "step " << p;
    for (size_t i = 0; i < seqs.size(); ++i) states[seqs[i]] = step[i];
  }
  // The final conv window is the sequence's last K-1 rows (zeros before its start).
  EXPECT_TRUE(at::equal(states[0].conv, in.qkv.narrow(0, 67, 3)));
  EXPECT_TRUE(at::equal(states[1].conv, in.qkv.narrow(0, 70, 3)));
  EXPECT_EQ(states[2].recurrent.sizes(), (std::vector<int64_t>{4, 8, 6}));
  EXPECT_EQ(states[2].recurrent.scalar_type(), at::kFloat);
}

// A decode step of one token per sequence gives each sequence the same bits whatever
// decodes beside it and however many threads run it; in bfloat16 it stays within
// rounding of the differentiable path (which a step takes when its inputs need a gradient).
TEST(GatedDeltaNetTest, SingleTokenStepsAreBatchAndThreadInvariant) {
  at::manual_seed(5);
  for (const at::ScalarType type : {at::kFloat, at::kBFloat16}) {
    const GdnDims d = Dims();
    GdnWeights w = RandomWeights(d);
    w.conv_weight = w.conv_weight.to(type);
    w.norm_weight = w.norm_weight.to(type);
    const GdnInputs prompt = RandomInputs(d, 3 * 9), step = RandomInputs(d, 3);
    auto cast = [&](const GdnInputs& in) {
      return GdnInputs{in.qkv.to(type), in.z.to(type), in.b.to(type), in.a.to(type)};
    };
    std::vector<GdnState> states(3, GdnInitialState(d, prompt.qkv.to(type)));
    GatedDeltaNet(d, w, cast(prompt), {9, 9, 9}, &states);
    const int threads = at::get_num_threads();
    std::vector<GdnState> together = states;
    const at::Tensor all = GatedDeltaNet(d, w, cast(step), {1, 1, 1}, &together);
    for (int64_t s = 0; s < 3; ++s) {
      at::set_num_threads(s == 1 ? 2 : 1);
      std::vector<GdnState> alone = {states[s]};
      const at::Tensor one = GatedDeltaNet(d, w, cast(Rows(step, s, 1)), {1}, &alone);
      EXPECT_TRUE(at::equal(one, all.narrow(0, s, 1))) << "sequence " << s << " in " << type;
      EXPECT_TRUE(at::equal(alone[0].recurrent, together[s].recurrent)) << "state of " << s << " in " << type;
      EXPECT_TRUE(at::equal(alone[0].conv, together[s].conv)) << "window of " << s << " in " << type;
    }
    at::set_num_threads(threads);
    // The differentiable path for the same step.
    GdnInputs graded = cast(step);
    graded.qkv = graded.qkv.detach().requires_grad_();
    std::vector<GdnState> ref = states;
    const at::Tensor want = GatedDeltaNet(d, w, graded, {1, 1, 1}, &ref);
    ASSERT_TRUE(want.requires_grad());
    const double tol = type == at::kFloat ? 1e-5 : 2e-2;
    EXPECT_LT(RelDiff(all.to(at::kFloat), want.detach().to(at::kFloat)), tol) << type;
    for (int64_t s = 0; s < 3; ++s) {
      EXPECT_LT(RelDiff(together[s].recurrent, ref[s].recurrent.detach()), type == at::kFloat ? 1e-5 : 1e-2) << s;
    }
  }
}

TEST(GatedDeltaNetTest, EveryTensorGetsAGradient) {
  at::manual_seed(3);
  const GdnDims d = Dims();
  GdnWeights w = RandomWeights(d);
  GdnInputs in = RandomInputs(d, 80);
  std::vector<at::Tensor> leaves = {in.qkv, in.z, in.b, in.a, w.conv_weight, w.a_log, w.dt_bias, w.norm_weight};
  for (at::Tensor& t : leaves) t.requires_grad_(true);
  const at::Tensor out = GatedDeltaNet(d, w, in, {10, 70});
  const auto grads = torch::autograd::grad({out.pow(2).sum()}, leaves);
  for (size_t i = 0; i < grads.size(); ++i) {
    ASSERT_TRUE(grads[i].defined()) << "tensor " << i;
    EXPECT_TRUE(grads[i].isfinite().all().item<bool>()) << "tensor " << i;
    EXPECT_GT(grads[i].abs().sum().item<double>(), 0.0) << "tensor " << i;
  }
}

TEST(GatedDeltaNetTest, ColumnViewsOfOneFusedProjectionWork) {
  at::manual_seed(4);
  const GdnDims d = Dims();
  const GdnWeights w = RandomWeights(d);
  const std::vector<int64_t> lengths = {7, 70};
  const at::Tensor fused = at::randn({77, d.conv_dim() + d.value_dim() + 2 * d.num_v_heads});
  const GdnInputs views = {fused.narrow(1, 0, d.conv_dim()), fused.narrow(1, d.conv_dim(), d.value_dim()),
                           fused.narrow(1, d.conv_dim() + d.value_dim(), d.num_v_heads),
                           fused.narrow(1, d.conv_dim() + d.value_dim() + d.num_v_heads, d.num_v_heads)};
  const GdnInputs copies = {views.qkv.contiguous(), views.z.contiguous(), views.b.contiguous(),
                            views.a.contiguous()};
  EXPECT_LT(RelDiff(GatedDeltaNet(d, w, views, lengths), GatedDeltaNet(d, w, copies, lengths)), 1e-6);
}

std::string ErrorOf(const GdnDims& d, const GdnWeights& w, const GdnInputs& in, const std::vector<int64_t>& lengths) {
  try {
    GatedDeltaNet(d, w, in, lengths);
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

TEST(GatedDeltaNetTest, BadArgumentsAreRefusedByName) {
  const GdnDims d = Dims();
  const GdnWeights w = RandomWeights(d);
  const GdnInputs in = RandomInputs(d, 10);
  EXPECT_NE(ErrorOf(d, w, in, {4, 5}).find("qkv has shape [10, 56], expected [9, 56]"), std::string::npos);
  EXPECT_NE(ErrorOf(d, w, in, {10, 0}).find("lengths[1] = 0"), std::string::npos);
  GdnWeights bad = w;
  bad.a_log = at::zeros({3});
  EXPECT_NE(ErrorOf(d, bad, in, {10}).find("a_log has shape [3]"), std::string::npos);
  GdnDims odd = d;
  odd.num_v_heads = 3;
  EXPECT_NE(ErrorOf(odd, w, in, {10}).find("num_v_heads 3 is not a multiple of num_k_heads 2"), std::string::npos);
  std::vector<GdnState> states(1, GdnInitialState(d, in.qkv));
  states[0].recurrent = at::zeros({4, 6, 8});
  try {
    GatedDeltaNet(d, w, in, {10}, &states);
    ADD_FAILURE() << "a transposed state was accepted";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find("state.recurrent has shape [4, 6, 8]"), std::string::npos);
  }
}

}  // namespace
}  // namespace lathe::runtime
