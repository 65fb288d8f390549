// Trainer behaviour a user sees: refused batches name the datum and field and
// change nothing; gradients accumulate across calls; AdamW's first step.
#include "runtime/trainer.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>

#include "runtime/adamw.h"
#include "runtime/decoder_model.h"
#include "runtime/tensor_data.h"
#include "runtime/tiny_model.h"
#include "tests/runtime/wire_datum.h"

namespace lathe::runtime {
namespace {

using lathe::v1::Datum;
using lathe::v1::ForwardBackwardInput;

class TrainerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = ::testing::TempDir() + "/trainer_test_model";
    TinyModelSpec spec;
    spec.vocab_size = 64;
    spec.hidden_size = 32;
    spec.head_dim = 8;
    spec.num_experts = 4;
    ASSERT_TRUE(WriteTinyModel(dir_, spec).ok());
  }
  void SetUp() override {
    LoraSettings lora;
    lora.rank = 4;
    auto t = Trainer::Create({dir_, lora, 16, 0});
    ASSERT_TRUE(t.ok()) << t.status();
    trainer_ = *std::move(t);
    // Non-zero B so that every LoRA tensor gets a gradient.
    const char* seed = std::getenv("LATHE_TEST_SEED");
    at::manual_seed(seed ? std::atoi(seed) : 0);
    for (TrainableParam& p : trainer_->model().trainable()) {
      at::NoGradGuard g;
      p.tensor.normal_(0.0, 0.05);
    }
  }
  ForwardBackwardInput Batch() {
    ForwardBackwardInput in;
    in.set_loss_fn("cross_entropy");
    *in.add_data() = MakeDatum({1, 2, 3, 4}, {2, 3, 4, 5}, {1, 1, 1, 1});
    *in.add_data() = MakeDatum({7, 8, 9}, {8, 9, -100}, {1, -0.5f, 1});
    return in;
  }
  std::vector<at::Tensor> Snapshot() {
    std::vector<at::Tensor> out;
    for (TrainableParam& p : trainer_->model().trainable()) {
      out.push_back(p.tensor.detach().clone());
      out.push_back(p.tensor.grad().defined() ? p.tensor.grad().clone() : at::Tensor());
    }
    return out;
  }
  static std::string dir_;
  std::unique_ptr<Trainer> trainer_;
};
std::string TrainerTest::dir_;

void ExpectSame(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i].defined(), b[i].defined());
    if (a[i].defined()) {
      EXPECT_TRUE(at::equal(a[i], b[i])) << "tensor " << i;
    }
  }
}

void ExpectRefusal(Trainer& t, const ForwardBackwardInput& in, const std::string& needle) {
  auto r = t.ForwardBackward(in);
  ASSERT_FALSE(r.ok()) << needle;
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find(needle), std::string::npos) << r.status();
}

TEST_F(TrainerTest, RefusedBatchesNameTheProblemAndChangeNothing) {
  ASSERT_TRUE(trainer_->ForwardBackward(Batch()).ok());
  auto before = Snapshot();
  ForwardBackwardInput in = Batch();
  *in.mutable_data(1) = MakeDatum({7, 64, 9}, {8, 9, 1}, {1, 1, 1});
  ExpectRefusal(*trainer_, in, "datum 1: model_input holds token id 64");
  in = Batch();
  (*in.mutable_data(0)->mutable_loss_fn_inputs())["target_tokens"] = Wire<int64_t>({2, 3, 4, 99}, lathe::v1::INT64);
  ExpectRefusal(*trainer_, in, "datum 0: loss_fn_inputs['target_tokens'] holds token id 99");
  in = Batch();
  (*in.mutable_data(1)->mutable_loss_fn_inputs())["weights"] = Wire<float>({1, NAN, 1}, lathe::v1::FLOAT32);
  ExpectRefusal(*trainer_, in, "datum 1: loss_fn_inputs['weights'] element 1 is nan");
  // Values a double holds but the float32 computation cannot.
  in = Batch();
  (*in.mutable_data(0)->mutable_loss_fn_inputs())["weights"] = Wire<double>({1, 1e300, 1, 1}, lathe::v1::FLOAT64);
  ExpectRefusal(*trainer_, in, "datum 0: loss_fn_inputs['weights'] element 1 is 1e+300; it must be finite in float32");
  in = Batch();
  (*in.mutable_data(0)->mutable_loss_fn_inputs())["target_tokens"] =
      Wire<int64_t>({2, INT64_MAX, 4, 5}, lathe::v1::INT64);
  ExpectRefusal(*trainer_, in, "holds token id 9223372036854775807 at element 1");
  // A shape whose element count overflows int64 with a handful of values.
  in = Batch();
  lathe::v1::TensorData wide = Wire<int64_t>({1, 2, 3, 4, 5, 6, 7, 8}, lathe::v1::INT64);
  wide.clear_shape();
  wide.add_shape(4);
  wide.add_shape((int64_t{1} << 62) + 1);
  (*in.mutable_data(0)->mutable_loss_fn_inputs())["target_tokens"] = wide;
  in.mutable_data(0)->mutable_loss_fn_inputs()->erase("weights");
  ExpectRefusal(*trainer_, in, "entries per position; at most 64");
  in = Batch();
  in.set_loss_fn("dro");
  for (int d = 0; d < 2; ++d) {
    const int n = d == 0 ? 4 : 3;
    auto& inputs = *in.mutable_data(d)->mutable_loss_fn_inputs();
    inputs.erase("weights");
    inputs["logprobs"] = Wire<float>(std::vector<float>(n, -1), lathe::v1::FLOAT32);
    inputs["advantages"] = Wire<float>(std::vector<float>(n, 1), lathe::v1::FLOAT32);
  }
  (*in.mutable_loss_fn_config())["beta"] = -1e308;
  ExpectRefusal(*trainer_, in, "loss_fn_config['beta'] is -1e+308");
  in.set_loss_fn("ppo");
  in.clear_loss_fn_config();
  (*in.mutable_loss_fn_config())["clip_high_threshold"] = 1e39;
  ExpectRefusal(*trainer_, in, "loss_fn_config['clip_high_threshold'] is 1e+39");
  in = Batch();
  (*in.mutable_data(0)->mutable_loss_fn_inputs())["weights"] = Wire<float>({1, 1}, lathe::v1::FLOAT32);
  ExpectRefusal(*trainer_, in, "has length 2 but model_input has 4 tokens");
  in = Batch();
  (*in.mutable_data(0)->mutable_loss_fn_inputs())["weights"] = Wire<double>({1, 1, 1, 1}, lathe::v1::FLOAT64);
  (*in.mutable_data(0)->mutable_loss_fn_inputs())["target_tokens"] = Wire<float>({1, 1, 1, 1}, lathe::v1::FLOAT32);
  ExpectRefusal(*trainer_, in, "must have dtype int64 or int32");
  in = Batch();
  in.set_loss_fn("importance_sampling");
  ExpectRefusal(*trainer_, in, "datum 0: loss_fn_inputs lacks 'logprobs'");
  in = Batch();
  in.set_loss_fn("nll");
  ExpectRefusal(*trainer_, in, "unknown loss_fn 'nll'");
  in = Batch();
  (*in.mutable_loss_fn_config())["clip_low_threshold"] = 0.5;
  ExpectRefusal(*trainer_, in, "loss_fn_config key 'clip_low_threshold'");
  in = Batch();
  *in.mutable_data(1) = MakeDatum(std::vector<int32_t>(17, 1), std::vector<int64_t>(17, 1), std::vector<float>(17, 1));
  ExpectRefusal(*trainer_, in, "datum 1: model_input has 17 tokens; max_seq_len is 16");
  in.clear_data();
  ExpectRefusal(*trainer_, in, "empty batch");
  lathe::v1::AdamParams bad;
  bad.set_learning_rate(NAN);
  EXPECT_EQ(trainer_->OptimStep(bad).status().code(), absl::StatusCode::kInvalidArgument);
  for (auto [field, value] : {std::pair<std::string, double>{"learning_rate", 1e308}, {"weight_decay", 1e308},
                              {"eps", 5e-324}, {"grad_clip_norm", 1e39}, {"weight_decay", 2000.0}}) {
    lathe::v1::AdamParams p;
    p.set_learning_rate(1e-3);
    if (field == "learning_rate") p.set_learning_rate(value);
    if (field == "weight_decay") p.set_weight_decay(value);
    if (field == "eps") p.set_eps(value);
    if (field == "grad_clip_norm") p.set_grad_clip_norm(value);
    absl::StatusOr<lathe::v1::OptimStepOutput> r = trainer_->OptimStep(p);
    ASSERT_FALSE(r.ok()) << field << " " << value;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find("adam_params." + field), std::string::npos) << r.status();
  }
  ExpectSame(before, Snapshot());
  EXPECT_EQ(trainer_->GetInfo().step, 0);
}

ForwardBackwardInput GspoBatch() {
  ForwardBackwardInput in;
  in.set_loss_fn("gspo");
  *in.add_data() = MakeDatum({1, 2, 3, 4}, {2, 3, 4, 5}, {});
  *in.add_data() = MakeDatum({7, 8, 9}, {8, 9, -100}, {});
  for (int d = 0; d < 2; ++d) {
    const size_t n = d == 0 ? 4 : 3;
    auto& inputs = *in.mutable_data(d)->mutable_loss_fn_inputs();
    inputs.erase("weights");
    inputs["logprobs"] = Wire<float>(std::vector<float>(n, -4), lathe::v1::FLOAT32);
    inputs["advantages"] = Wire<float>(std::vector<float>(n, 1), lathe::v1::FLOAT32);
    inputs["sequence_ratio_mask"] = Wire<float>(std::vector<float>(n, 1), lathe::v1::FLOAT32);
  }
  return in;
}

TEST_F(TrainerTest, GspoRefusesHostileInputsAndSurvivesSequencesWithoutRatioOrLossTokens) {
  ASSERT_TRUE(trainer_->ForwardBackward(Batch()).ok());
  auto before = Snapshot();
  ForwardBackwardInput in = GspoBatch();
  in.mutable_data(1)->mutable_loss_fn_inputs()->erase("sequence_ratio_mask");
  ExpectRefusal(*trainer_, in, "datum 1: loss_fn_inputs lacks 'sequence_ratio_mask'");
  in = GspoBatch();
  (*in.mutable_data(1)->mutable_loss_fn_inputs())["sequence_ratio_mask"] = Wire<float>({1, 1, NAN}, lathe::v1::FLOAT32);
  ExpectRefusal(*trainer_, in, "datum 1: loss_fn_inputs['sequence_ratio_mask'] element 2 is nan");
  in = GspoBatch();
  (*in.mutable_data(0)->mutable_loss_fn_inputs())["sequence_ratio_mask"] =
      Wire<double>({1, -1e300, 1, 1}, lathe::v1::FLOAT64);
  ExpectRefusal(*trainer_, in, "datum 0: loss_fn_inputs['sequence_ratio_mask'] element 1 is -1e+300; it must be finite");
  in = GspoBatch();
  (*in.mutable_data(1)->mutable_loss_fn_inputs())["advantages"] = Wire<float>({1, INFINITY, 1}, lathe::v1::FLOAT32);
  ExpectRefusal(*trainer_, in, "datum 1: loss_fn_inputs['advantages'] element 1 is inf");
  in = GspoBatch();
  (*in.mutable_data(0)->mutable_loss_fn_inputs())["sequence_ratio_mask"] = Wire<float>({1, 1}, lathe::v1::FLOAT32);
  ExpectRefusal(*trainer_, in, "loss_fn_inputs['sequence_ratio_mask'] has length 2 but model_input has 4 tokens");
  in = GspoBatch();
  (*in.mutable_loss_fn_config())["clip_low_threshold"] = 1e39;
  ExpectRefusal(*trainer_, in, "loss_fn_config['clip_low_threshold'] is 1e+39");
  in = GspoBatch();
  (*in.mutable_loss_fn_config())["beta"] = 0.1;
  ExpectRefusal(*trainer_, in, "loss_fn_config key 'beta' is not accepted by gspo");
  ExpectSame(before, Snapshot());
  // No token in the ratio (datum 0) and no loss token at all (datum 1): a
  // finite loss and finite gradients, no NaN from an empty mean.
  in = GspoBatch();
  (*in.mutable_data(0)->mutable_loss_fn_inputs())["sequence_ratio_mask"] = Wire<float>({0, 0, 0, 0}, lathe::v1::FLOAT32);
  (*in.mutable_data(1)->mutable_loss_fn_inputs())["target_tokens"] = Wire<int64_t>({-100, -100, -100}, lathe::v1::INT64);
  auto r = trainer_->ForwardBackward(in);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(std::isfinite(r->metrics().at("loss:sum")));
  ASSERT_EQ(r->loss_fn_outputs_size(), 2);
  at::Tensor el0 = TensorFromWire(r->loss_fn_outputs(0).tensors().at("elementwise_loss"));
  at::Tensor el1 = TensorFromWire(r->loss_fn_outputs(1).tensors().at("elementwise_loss"));
  // Ratio 1 inside the clip range: each token's loss is -A = -1.
  EXPECT_TRUE(at::allclose(el0, at::full_like(el0, -1.0f))) << el0;
  EXPECT_EQ(el1.abs().sum().item<float>(), 0.0f);
  for (TrainableParam& p : trainer_->model().trainable()) {
    ASSERT_TRUE(p.tensor.grad().defined()) << p.name;
    EXPECT_TRUE(p.tensor.grad().isfinite().all().item<bool>()) << p.name;
  }
}

// A loss that overflows float32 (weights at float32's edge) fails the call on
// its datum, and the gradients accumulated before it stay as they were.
TEST_F(TrainerTest, NonFiniteLossFailsTheCallAndKeepsEarlierGradients) {
  ASSERT_TRUE(trainer_->ForwardBackward(Batch()).ok());
  auto before = Snapshot();
  ForwardBackwardInput in = Batch();
  (*in.mutable_data(1)->mutable_loss_fn_inputs())["weights"] = Wire<float>({3e38f, 3e38f, 3e38f}, lathe::v1::FLOAT32);
  auto r = trainer_->ForwardBackward(in);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("datum 1: the loss is"), std::string::npos) << r.status();
  ExpectSame(before, Snapshot());
  lathe::v1::AdamParams adam;
  auto step = trainer_->OptimStep(adam);
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_TRUE(std::isfinite(step->metrics().at("grad_norm:mean")));
}

// optim_step never applies a non-finite update: the run keeps its weights,
// moments and step, and the poisoned gradients are dropped.
TEST_F(TrainerTest, OptimStepRefusesANonFiniteUpdate) {
  ASSERT_TRUE(trainer_->ForwardBackward(Batch()).ok());
  ASSERT_TRUE(trainer_->OptimStep(lathe::v1::AdamParams()).ok());
  {
    // Finite gradients and a finite learning rate whose step overflows a
    // weight near float32's edge.
    at::NoGradGuard g;
    for (TrainableParam& p : trainer_->model().trainable()) p.tensor.mutable_grad() = -at::ones_like(p.tensor);
    trainer_->model().trainable().front().tensor.fill_(3e38);
  }
  lathe::v1::AdamParams huge;
  huge.set_learning_rate(1e38);
  std::vector<at::Tensor> weights, moments;
  for (TrainableParam& p : trainer_->model().trainable()) weights.push_back(p.tensor.detach().clone());
  for (AdamW::State& s : trainer_->optimizer().states()) moments.push_back(s.exp_avg_sq.clone());
  auto r = trainer_->OptimStep(huge);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(r.status().message().find("non-finite"), std::string::npos) << r.status();
  EXPECT_EQ(trainer_->GetInfo().step, 1);
  ASSERT_EQ(trainer_->optimizer().states().size(), weights.size());
  for (size_t i = 0; i < weights.size(); ++i) {
    const TrainableParam& p = trainer_->model().trainable()[i];
    EXPECT_TRUE(at::equal(p.tensor.detach(), weights[i])) << p.name;
    EXPECT_TRUE(at::equal(trainer_->optimizer().states()[i].exp_avg_sq, moments[i])) << p.name;
    EXPECT_FALSE(p.tensor.grad().defined()) << p.name;
  }
  // A gradient that is not finite is refused before any arithmetic.
  {
    at::NoGradGuard g;
    for (TrainableParam& p : trainer_->model().trainable()) p.tensor.mutable_grad() = at::ones_like(p.tensor);
    trainer_->model().trainable().back().tensor.mutable_grad().fill_(INFINITY);
  }
  r = trainer_->OptimStep(lathe::v1::AdamParams());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("the gradient norm is inf"), std::string::npos) << r.status();
  EXPECT_EQ(trainer_->GetInfo().step, 1);
}

TEST_F(TrainerTest, GradientsAccumulateAcrossCallsAsOneBatch) {
  ForwardBackwardInput both = Batch();
  auto whole = trainer_->ForwardBackward(both);
  ASSERT_TRUE(whole.ok());
  auto combined = Snapshot();
  for (TrainableParam& p : trainer_->model().trainable()) p.tensor.mutable_grad() = at::Tensor();
  ForwardBackwardInput first = Batch(), second = Batch();
  first.mutable_data()->RemoveLast();
  second.mutable_data()->DeleteSubrange(0, 1);
  auto a = trainer_->ForwardBackward(first);
  auto b = trainer_->ForwardBackward(second);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_NEAR(a->metrics().at("loss:sum") + b->metrics().at("loss:sum"), whole->metrics().at("loss:sum"), 1e-5);
  auto split = Snapshot();
  for (size_t i = 1; i < split.size(); i += 2) {
    EXPECT_TRUE(at::allclose(split[i], combined[i], 1e-4, 1e-6))
        << i << " max diff " << (split[i] - combined[i]).abs().max().item<float>() << " max "
        << combined[i].abs().max().item<float>();
  }
  EXPECT_EQ(whole->loss_fn_outputs_size(), 2);
  EXPECT_EQ(whole->metrics().at("num_loss_tokens:sum"), 6);
  EXPECT_GT(whole->metrics().at("moe_frac_experts_with_tokens:mean"), 0);
}

TEST_F(TrainerTest, ForwardLeavesGradientsAlone) {
  auto before = Snapshot();
  auto out = trainer_->Forward(Batch());
  ASSERT_TRUE(out.ok());
  ExpectSame(before, Snapshot());
  const auto& lp = out->loss_fn_outputs(1).tensors().at("logprobs");
  float values[3];
  std::memcpy(values, lp.data().data(), sizeof(values));
  EXPECT_LT(values[0], 0.0f);
  EXPECT_EQ(values[2], 0.0f);  // ignored target
}

TEST_F(TrainerTest, FirstAdamStepMovesEachWeightByTheLearningRate) {
  ASSERT_TRUE(trainer_->ForwardBackward(Batch()).ok());
  auto before = Snapshot();
  lathe::v1::AdamParams adam;
  adam.set_learning_rate(0.01);
  auto out = trainer_->OptimStep(adam);
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(out->metrics().at("step:max"), 1);
  // Step 1 with zero state: Δ = -lr · g / (|g| + eps·…) = -lr · sign(g).
  auto& params = trainer_->model().trainable();
  const TrainableParam& p = params.front();
  at::Tensor delta = p.tensor.detach() - before[0];
  at::Tensor expected = -0.01 * at::sign(before[1]);
  EXPECT_TRUE(at::allclose(delta, expected, 1e-4, 1e-6));
  EXPECT_FALSE(p.tensor.grad().defined());  // cleared after the step
}

}  // namespace
}  // namespace lathe::runtime

namespace lathe::runtime {
namespace {

TEST_F(TrainerTest, PackedMicroBatchesMatchOneDatumAtATime) {
  LoraSettings lora;
  lora.rank = 4;
  auto single = Trainer::Create({dir_, lora, 16, /*micro_batch_tokens=*/1});
  ASSERT_TRUE(single.ok());
  for (size_t i = 0; i < trainer_->model().trainable().size(); ++i) {
    at::NoGradGuard g;
    (*single)->model().trainable()[i].tensor.copy_(trainer_->model().trainable()[i].tensor);
  }
  auto packed = trainer_->ForwardBackward(Batch());
  auto alone = (*single)->ForwardBackward(Batch());
  ASSERT_TRUE(packed.ok() && alone.ok());
  EXPECT_NEAR(packed->metrics().at("loss:sum"), alone->metrics().at("loss:sum"), 1e-4);
  for (int d = 0; d < 2; ++d) {
    const std::string& a = packed->loss_fn_outputs(d).tensors().at("logprobs").data();
    const std::string& b = alone->loss_fn_outputs(d).tensors().at("logprobs").data();
    ASSERT_EQ(a.size(), b.size());
    for (size_t k = 0; k < a.size() / 4; ++k) {
      float x, y;
      std::memcpy(&x, a.data() + 4 * k, 4);
      std::memcpy(&y, b.data() + 4 * k, 4);
      EXPECT_NEAR(x, y, 1e-5) << "datum " << d << " position " << k;
    }
  }
  for (size_t i = 0; i < trainer_->model().trainable().size(); ++i) {
    EXPECT_TRUE(at::allclose(trainer_->model().trainable()[i].tensor.grad(),
                             (*single)->model().trainable()[i].tensor.grad(), 1e-4, 1e-6));
  }
}

}  // namespace
}  // namespace lathe::runtime
