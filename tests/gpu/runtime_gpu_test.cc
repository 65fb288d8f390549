// The runtime on a CUDA device against the same runtime on the CPU: LoRA
// initialisation, a training step, a checkpoint round trip, PEFT export and
// batch-invariant sampling. Exits 77 (ctest: skipped), saying why, where
// no CUDA device is visible to libtorch.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>

#include "runtime/adamw.h"
#include "runtime/checkpoint.h"
#include "runtime/decoder_model.h"
#include "runtime/device.h"
#include "runtime/generate.h"
#include "tensor/invariant_linear.h"
#include "runtime/tiny_model.h"
#include "runtime/trainer.h"
#include "tests/runtime/wire_datum.h"

namespace lathe::runtime {
namespace {

using lathe::v1::Datum;
using lathe::v1::ForwardBackwardInput;

ForwardBackwardInput Batch() {
  ForwardBackwardInput in;
  in.set_loss_fn("cross_entropy");
  *in.add_data() = MakeDatum({1, 2, 3, 4, 5, 6}, {2, 3, 4, 5, 6, 7}, {1, 1, 1, 1, 1, 1});
  *in.add_data() = MakeDatum({7, 8, 9}, {8, 9, -100}, {1, -0.5f, 1});
  return in;
}

// Tiny dense and MoE models, written once.
std::string TinyModel(bool moe) {
  const std::string dir = ::testing::TempDir() + (moe ? "/gpu_test_moe" : "/gpu_test_dense");
  if (!std::filesystem::exists(dir + "/config.json")) {
    TinyModelSpec spec;
    spec.moe = moe;
    spec.vocab_size = 96;
    spec.hidden_size = 72;
    EXPECT_TRUE(WriteTinyModel(dir, spec).ok());
  }
  return dir;
}

std::unique_ptr<Trainer> MakeTrainer(const std::string& dir, int device) {
  LoraSettings lora;
  lora.rank = 4;
  TrainerOptions o{dir, lora, 64, 0};
  o.device = device;
  auto t = Trainer::Create(o);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? std::move(*t) : nullptr;
}

// Largest |a - b| over the trainable tensors of two trainers (b may be on another device).
double MaxDiff(Trainer& a, Trainer& b) {
  double worst = 0;
  auto& pa = a.model().trainable();
  auto& pb = b.model().trainable();
  EXPECT_EQ(pa.size(), pb.size());
  for (size_t i = 0; i < pa.size() && i < pb.size(); ++i) {
    EXPECT_EQ(pa[i].name, pb[i].name);
    worst = std::max(worst, (pa[i].tensor.cpu() - pb[i].tensor.cpu()).abs().max().item<double>());
  }
  return worst;
}

class GpuTest : public ::testing::TestWithParam<bool> {};

TEST_P(GpuTest, ModelAndLoraLiveOnTheDeviceWithTheCpuInitialisation) {
  auto cpu = MakeTrainer(TinyModel(GetParam()), -1);
  auto gpu = MakeTrainer(TinyModel(GetParam()), 0);
  ASSERT_TRUE(cpu && gpu);
  EXPECT_TRUE(gpu->model().device().is_cuda());
  for (const TrainableParam& p : gpu->model().trainable()) {
    EXPECT_TRUE(p.tensor.is_cuda()) << p.name;
    EXPECT_TRUE(p.tensor.is_leaf() && p.tensor.requires_grad()) << p.name;
  }
  EXPECT_EQ(MaxDiff(*cpu, *gpu), 0.0) << "LoRA is drawn on the CPU, then moved: bitwise the same";
}

TEST_P(GpuTest, TrainingStepOnTheDeviceEqualsTheCpuStep) {
  auto cpu = MakeTrainer(TinyModel(GetParam()), -1);
  auto gpu = MakeTrainer(TinyModel(GetParam()), 0);
  ASSERT_TRUE(cpu && gpu);
  // Adam scales each update to about the learning rate whatever the gradient's
  // size: 1e-3 keeps float32 rounding differences between devices well below 1e-5.
  lathe::v1::AdamParams adam;
  adam.set_learning_rate(1e-3);
  for (int step = 0; step < 2; ++step) {
    auto fc = cpu->ForwardBackward(Batch());
    auto fg = gpu->ForwardBackward(Batch());
    ASSERT_TRUE(fc.ok() && fg.ok()) << fc.status() << fg.status();
    const double lc = fc->metrics().at("loss:sum"), lg = fg->metrics().at("loss:sum");
    EXPECT_NEAR(lg, lc, 1e-4 * std::max(1.0, std::abs(lc))) << "step " << step;
    auto oc = cpu->OptimStep(adam);
    auto og = gpu->OptimStep(adam);
    ASSERT_TRUE(oc.ok() && og.ok()) << oc.status() << og.status();
    EXPECT_NEAR(og->metrics().at("grad_norm:mean"), oc->metrics().at("grad_norm:mean"),
                1e-4 * std::max(1.0, oc->metrics().at("grad_norm:mean")));
    EXPECT_LT(MaxDiff(*cpu, *gpu), 1e-5) << "step " << step;
  }
  for (const TrainableParam& p : gpu->model().trainable()) EXPECT_TRUE(p.tensor.is_cuda()) << p.name;
}

TEST_P(GpuTest, CheckpointRoundTripOnTheDevice) {
  const std::string root = ::testing::TempDir() + "/gpu_ckpt_" + (GetParam() ? "moe" : "dense");
  std::filesystem::remove_all(root);
  auto gpu = MakeTrainer(TinyModel(GetParam()), 0);
  ASSERT_TRUE(gpu);
  ASSERT_TRUE(gpu->ForwardBackward(Batch()).ok());
  lathe::v1::AdamParams adam;
  adam.set_learning_rate(1e-2);
  ASSERT_TRUE(gpu->OptimStep(adam).ok());
  CheckpointMeta meta;
  meta.run_id = "run";
  meta.name = "a";
  ASSERT_TRUE(SaveCheckpoint(*gpu, root + "/a", false, meta, {}, nullptr, absl::Seconds(30)).ok());
  for (int device : {0, -1}) {
    auto back = MakeTrainer(TinyModel(GetParam()), device);
    ASSERT_TRUE(back);
    auto step = LoadCheckpoint(*back, root + "/a", /*with_optimizer=*/true, nullptr, absl::Seconds(30));
    ASSERT_TRUE(step.ok()) << step.status();
    EXPECT_EQ(*step, 1);
    EXPECT_EQ(MaxDiff(*gpu, *back), 0.0) << "device " << device;
    auto& sa = gpu->optimizer().states();
    auto& sb = back->optimizer().states();
    ASSERT_EQ(sa.size(), sb.size());
    for (size_t i = 0; i < sa.size(); ++i) {
      EXPECT_TRUE(at::equal(sa[i].exp_avg.cpu(), sb[i].exp_avg.cpu())) << i;
      EXPECT_TRUE(at::equal(sa[i].exp_avg_sq.cpu(), sb[i].exp_avg_sq.cpu())) << i;
      EXPECT_EQ(sb[i].exp_avg.device(), back->model().device()) << i;
    }
  }
}

SampleRequest Request(std::vector<int32_t> prompt, int n, double temperature, int64_t max_tokens, uint64_t seed) {
  SampleRequest r;
  r.prompt = std::move(prompt);
  r.num_samples = n;
  r.settings.temperature = temperature;
  r.settings.max_tokens = max_tokens;
  r.settings.seed = seed;
  return r;
}

// What docs/sampling.md promises on a GPU: the same batch twice gives the
// same tokens (bitwise logprobs for a dense model; an MoE model's expert
// combine uses atomic adds), and a request decoded beside others draws the
// tokens it draws alone, its logprobs equal to float32 rounding.
TEST_P(GpuTest, SamplingOnTheDeviceRepeatsAndFollowsNoNeighbour) {
  auto gpu = MakeTrainer(TinyModel(GetParam()), 0);
  ASSERT_TRUE(gpu);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(7);
  for (TrainableParam& p : gpu->model().trainable()) {
    at::NoGradGuard g;
    p.tensor.copy_(at::empty(p.tensor.sizes(), at::kFloat).normal_(0.0, 0.05, gen));
  }
  const DecoderModel& model = gpu->model();
  std::vector<SampleRequest> requests = {Request({1, 2, 3}, 1, 0.0, 9, 0), Request({5, 6, 7, 8, 9, 10}, 3, 1.0, 12, 11),
                                         Request({4}, 2, 0.7, 5, 12), Request({30, 31, 32, 33}, 4, 1.0, 6, 13)};
  auto together = GenerateBatch(model, requests, 64);
  auto again = GenerateBatch(model, requests, 64);
  for (size_t r = 0; r < requests.size(); ++r) {
    ASSERT_TRUE(together[r].ok() && again[r].ok());
    const SampleRequest& q = requests[r];
    auto alone = Generate(model, q.prompt, q.num_samples, q.settings, false, 64);
    ASSERT_TRUE(alone.ok()) << alone.status();
    for (size_t i = 0; i < alone->sequences.size(); ++i) {
      const GeneratedSequence &t = together[r]->sequences[i], &a = again[r]->sequences[i], &l = alone->sequences[i];
      EXPECT_EQ(t.tokens, a.tokens) << r << "/" << i;
      if (!GetParam()) {
        EXPECT_EQ(t.logprobs, a.logprobs) << r << "/" << i;
      }
      EXPECT_EQ(t.tokens, l.tokens) << r << "/" << i;
      ASSERT_EQ(t.logprobs.size(), l.logprobs.size());
      for (size_t k = 0; k < t.logprobs.size(); ++k) EXPECT_NEAR(t.logprobs[k], l.logprobs[k], 1e-5) << r << "/" << i;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(DenseAndMoe, GpuTest, ::testing::Bool());

TEST(InvariantLinearGpuTest, ARowIsTheSameWhateverTheRowsBesideIt) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(3);
  const at::Device cuda(at::kCUDA, 0);
  at::Tensor w = at::empty({200, 333}, at::kFloat).normal_(0, 1, gen).to(cuda);
  at::Tensor x = at::empty({70, 333}, at::kFloat).normal_(0, 1, gen).to(cuda);
  at::Tensor all = InvariantLinear(x, w).cpu();
  for (int64_t m : {1, 3, 16, 17, 40}) {
    at::Tensor part = InvariantLinear(x.narrow(0, 0, m), w).cpu();
    EXPECT_TRUE(at::equal(part, all.narrow(0, 0, m))) << "m=" << m;
  }
  EXPECT_LT((all - at::mm(x, w.t()).cpu()).abs().max().item<double>(), 1e-3);
}

}  // namespace
}  // namespace lathe::runtime

int main(int argc, char** argv) {
  if (!lathe::runtime::CudaAvailable()) {
    std::printf("SKIP: no CUDA device usable by libtorch (a CPU build of libtorch, or no GPU or driver); the gpu "
                "tests need the CUDA build (LATHE_CUDA=1) on a machine with a GPU\n");
    return 77;
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
