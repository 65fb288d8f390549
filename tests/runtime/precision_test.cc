// The compute dtype as a user sees it: the flag's values, what a bfloat16
// run holds in which dtype, and checkpoints that resume bitwise in each
// dtype (LoRA and full fine-tuning) and load across dtypes.
#include "core/dtype.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>

#include <fstream>
#include <tuple>

#include "nlohmann/json.hpp"
#include "runtime/adamw.h"
#include "runtime/checkpoint.h"
#include "runtime/decoder_model.h"
#include "runtime/tensor_data.h"
#include "runtime/trainer.h"
#include "tests/runtime/tiny_model_test.h"
#include "tests/runtime/wire_datum.h"

namespace lathe::runtime {
namespace {

using lathe::v1::ForwardBackwardInput;

// Two datums whose tokens depend on `seed`.
ForwardBackwardInput Batch(int seed) {
  ForwardBackwardInput in;
  in.set_loss_fn("cross_entropy");
  for (int d = 0; d < 2; ++d) {
    std::vector<int32_t> tokens;
    std::vector<int64_t> targets;
    std::vector<float> weights;
    for (int i = 0; i < 5 + 3 * d; ++i) {
      tokens.push_back((seed * 7 + d * 13 + i * 5) % 64);
      targets.push_back((seed * 3 + d * 11 + i * 7 + 1) % 64);
      weights.push_back(1.0f);
    }
    lathe::v1::Datum* datum = in.add_data();
    datum->mutable_model_input()->add_chunks()->mutable_encoded_text()->set_tokens(tokens.data(), tokens.size() * 4);
    (*datum->mutable_loss_fn_inputs())["target_tokens"] = Wire(targets, lathe::v1::INT64);
    (*datum->mutable_loss_fn_inputs())["weights"] = Wire(weights, lathe::v1::FLOAT32);
  }
  return in;
}

TEST(DtypeTest, ParsesBothNamesDefaultsByDeviceAndRefusesOthers) {
  EXPECT_EQ(*ParseDtype("float32", true), Dtype::kFloat32);
  EXPECT_EQ(*ParseDtype("bfloat16", false), Dtype::kBFloat16);
  EXPECT_EQ(*ParseDtype("", false), Dtype::kFloat32);
  EXPECT_EQ(*ParseDtype("", true), Dtype::kBFloat16);
  EXPECT_EQ(DefaultDtype(false), Dtype::kFloat32);
  EXPECT_EQ(DefaultDtype(true), Dtype::kBFloat16);
  EXPECT_STREQ(DtypeName(Dtype::kBFloat16), "bfloat16");
  EXPECT_STREQ(DtypeName(Dtype::kFloat32), "float32");
  for (const char* bad : {"fp16", "bf16", "Float32", "float16"}) {
    absl::StatusOr<Dtype> d = ParseDtype(bad, false);
    ASSERT_FALSE(d.ok()) << bad;
    EXPECT_TRUE(absl::IsInvalidArgument(d.status()));
    EXPECT_NE(d.status().message().find(std::string("'") + bad + "'"), std::string::npos) << d.status();
  }
}

constexpr char kPrecisionTestName[] = "precision_test";

class PrecisionTest : public TinyModelTest<kPrecisionTestName> {
 protected:
  std::unique_ptr<Trainer> Make(Dtype dtype, int64_t rank) {
    LoraSettings lora;
    lora.rank = rank;
    TrainerOptions options{Model(), lora, 32, 0};
    options.dtype = dtype;
    auto trainer = Trainer::Create(options);
    EXPECT_TRUE(trainer.ok()) << trainer.status();
    return trainer.ok() ? *std::move(trainer) : nullptr;
  }
  static void Step(Trainer& t, int seed) {
    ASSERT_TRUE(t.ForwardBackward(Batch(seed)).ok());
    ASSERT_TRUE(t.ForwardBackward(Batch(seed + 100)).ok());  // two calls accumulate
    lathe::v1::AdamParams adam;
    adam.set_learning_rate(1e-2);
    adam.set_weight_decay(0.01);
    ASSERT_TRUE(t.OptimStep(adam).ok());
  }
  absl::Status Save(Trainer& t, const std::string& name) {
    CheckpointMeta meta;
    meta.run_id = "run";
    meta.name = name;
    return SaveCheckpoint(t, root_ + "/" + name, false, meta, {}, nullptr, absl::Seconds(10));
  }
  // Every trainable value, bf16 copy, moment and the logprobs of a batch.
  static std::vector<at::Tensor> State(Trainer& t) {
    std::vector<at::Tensor> out;
    for (size_t i = 0; i < t.model().trainable().size(); ++i) {
      const TrainableParam& p = t.model().trainable()[i];
      out.push_back(p.tensor.detach().clone());
      if (p.compute.defined()) out.push_back(p.compute.detach().clone());
      out.push_back(t.optimizer().states()[i].exp_avg.clone());
      out.push_back(t.optimizer().states()[i].exp_avg_sq.clone());
    }
    auto fwd = t.Forward(Batch(5));
    EXPECT_TRUE(fwd.ok());
    for (const auto& o : fwd->loss_fn_outputs()) out.push_back(TensorFromWire(o.tensors().at("logprobs")));
    return out;
  }
};

TEST_F(PrecisionTest, BFloat16KeepsTrainableStateInFp32AndChangesTheNumbersOnlyByRounding) {
  auto fp32 = Make(Dtype::kFloat32, 4);
  auto bf16 = Make(Dtype::kBFloat16, 4);
  auto full = Make(Dtype::kBFloat16, 0);
  ASSERT_TRUE(fp32 && bf16 && full);
  EXPECT_EQ(bf16->GetInfo().dtype, Dtype::kBFloat16);
  EXPECT_EQ(fp32->GetInfo().dtype, Dtype::kFloat32);
  EXPECT_EQ(bf16->model().dtype(), Dtype::kBFloat16);
  auto a = fp32->ForwardBackward(Batch(1));
  auto b = bf16->ForwardBackward(Batch(1));
  auto f = full->ForwardBackward(Batch(1));
  ASSERT_TRUE(a.ok() && b.ok() && f.ok());
  for (const TrainableParam& p : bf16->model().trainable()) {
    EXPECT_EQ(p.tensor.scalar_type(), at::kFloat) << p.name;
    EXPECT_FALSE(p.compute.defined()) << p.name;
    ASSERT_TRUE(p.tensor.grad().defined()) << p.name;
    EXPECT_EQ(p.tensor.grad().scalar_type(), at::kFloat) << p.name;
  }
  for (const TrainableParam& p : full->model().trainable()) {
    EXPECT_EQ(p.tensor.scalar_type(), at::kFloat) << p.name;
    ASSERT_TRUE(p.compute.defined()) << p.name;
    EXPECT_EQ(p.compute.scalar_type(), at::kBFloat16) << p.name;
    EXPECT_TRUE(at::equal(p.compute.to(at::kFloat), p.tensor)) << p.name;
    ASSERT_TRUE(p.tensor.grad().defined()) << p.name;
    EXPECT_EQ(p.tensor.grad().scalar_type(), at::kFloat) << p.name;
    EXPECT_FALSE(p.compute.grad().defined()) << p.name << ": folded into the master's";
  }
  // The same model in bf16: logprobs near fp32's, but not equal (bf16 is in effect).
  for (int d = 0; d < 2; ++d) {
    at::Tensor x = TensorFromWire(a->loss_fn_outputs(d).tensors().at("logprobs"));
    at::Tensor y = TensorFromWire(b->loss_fn_outputs(d).tensors().at("logprobs"));
    at::Tensor z = TensorFromWire(f->loss_fn_outputs(d).tensors().at("logprobs"));
    EXPECT_EQ(y.scalar_type(), at::kFloat);
    EXPECT_FALSE(at::equal(x, y));
    EXPECT_LT((x - y).abs().max().item<double>(), 0.05);
    EXPECT_LT((y - z).abs().max().item<double>(), 0.05) << "LoRA with B = 0 and the full model compute alike";
  }
}

// (full fine-tuning, dtype)
class ResumeTest : public PrecisionTest, public ::testing::WithParamInterface<std::tuple<bool, Dtype>> {};

TEST_P(ResumeTest, SaveContinueLoadContinueIsBitwiseTheSame) {
  const auto [full, dtype] = GetParam();
  auto t = Make(dtype, full ? 0 : 4);
  ASSERT_TRUE(t);
  Step(*t, 1);
  Step(*t, 2);
  ASSERT_TRUE(Save(*t, "ckpt").ok());
  Step(*t, 3);
  Step(*t, 4);
  const std::vector<at::Tensor> first = State(*t);
  absl::StatusOr<int64_t> step = LoadCheckpoint(*t, root_ + "/ckpt", true, nullptr, absl::Seconds(10));
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_EQ(*step, 2);
  Step(*t, 3);
  Step(*t, 4);
  const std::vector<at::Tensor> second = State(*t);
  ASSERT_EQ(first.size(), second.size());
  for (size_t i = 0; i < first.size(); ++i) EXPECT_TRUE(at::equal(first[i], second[i])) << "tensor " << i;
  // A fresh trainer that loads the checkpoint continues alike.
  auto fresh = Make(dtype, full ? 0 : 4);
  ASSERT_TRUE(LoadCheckpoint(*fresh, root_ + "/ckpt", true, nullptr, absl::Seconds(10)).ok());
  Step(*fresh, 3);
  Step(*fresh, 4);
  const std::vector<at::Tensor> third = State(*fresh);
  for (size_t i = 0; i < first.size(); ++i) EXPECT_TRUE(at::equal(first[i], third[i])) << "tensor " << i;
  std::ifstream manifest(root_ + "/ckpt/manifest.json");
  EXPECT_EQ(nlohmann::json::parse(manifest).at("dtype"), DtypeName(dtype));
}

INSTANTIATE_TEST_SUITE_P(LoraAndFull, ResumeTest,
                         ::testing::Combine(::testing::Bool(), ::testing::Values(Dtype::kFloat32, Dtype::kBFloat16)));

TEST_F(PrecisionTest, ACheckpointLoadsUnderTheOtherDtypeWithItsFp32ValuesIntact) {
  for (int64_t rank : {4, 0}) {
    auto bf16 = Make(Dtype::kBFloat16, rank);
    Step(*bf16, 1);
    const std::string name = rank > 0 ? "lora" : "full";
    ASSERT_TRUE(Save(*bf16, name).ok());
    auto fp32 = Make(Dtype::kFloat32, rank);
    ASSERT_TRUE(LoadCheckpoint(*fp32, root_ + "/" + name, true, nullptr, absl::Seconds(10)).ok());
    for (size_t i = 0; i < fp32->model().trainable().size(); ++i) {
      EXPECT_TRUE(at::equal(fp32->model().trainable()[i].tensor, bf16->model().trainable()[i].tensor));
      EXPECT_TRUE(at::equal(fp32->optimizer().states()[i].exp_avg_sq, bf16->optimizer().states()[i].exp_avg_sq));
    }
    // And back: a bf16 run loading it rounds its copies from the fp32 values.
    auto again = Make(Dtype::kBFloat16, rank);
    ASSERT_TRUE(LoadCheckpoint(*again, root_ + "/" + name, true, nullptr, absl::Seconds(10)).ok());
    const std::vector<at::Tensor> x = State(*again), y = State(*bf16);
    for (size_t i = 0; i < x.size(); ++i) EXPECT_TRUE(at::equal(x[i], y[i])) << name << " tensor " << i;
  }
}

}  // namespace
}  // namespace lathe::runtime
