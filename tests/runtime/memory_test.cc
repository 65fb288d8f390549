// What bounds a training step's memory: attention whose backward keeps no
// [T, T] scores, and layers recomputed in the backward with the gradients of
// the plain pass.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/function.h>

#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "google/protobuf/util/message_differencer.h"
#include "runtime/decoder_model.h"
#include "runtime/trainer.h"
#include "runtime/tiny_model.h"

namespace lathe::runtime {
namespace {

// How many nodes of each name the autograd graph behind `t` holds.
std::map<std::string, int> NodeNames(const at::Tensor& t) {
  std::map<std::string, int> names;
  std::set<torch::autograd::Node*> seen;
  std::vector<torch::autograd::Node*> todo = {t.grad_fn().get()};
  while (!todo.empty()) {
    torch::autograd::Node* n = todo.back();
    todo.pop_back();
    if (n == nullptr || !seen.insert(n).second) continue;
    names[n->name()] += 1;
    for (const torch::autograd::Edge& e : n->next_edges()) todo.push_back(e.function.get());
  }
  return names;
}

std::string TinyModel(const std::string& name, bool moe) {
  TinyModelSpec spec;
  spec.moe = moe;
  spec.num_experts = 4;
  spec.vocab_size = 64;
  spec.hidden_size = 32;
  spec.num_heads = 4;
  spec.num_kv_heads = 2;  // GQA
  spec.head_dim = 8;
  const std::string dir = ::testing::TempDir() + "/" + name;
  EXPECT_TRUE(WriteTinyModel(dir, spec).ok());
  return dir;
}

// The CPU flash-attention kernel (online softmax over key blocks) keeps
// O(T) per head for its backward; the math fallback would keep the [T, T]
// softmax. Training must stay on the former: packed sequences, GQA, LoRA.
TEST(MemoryTest, TrainingAttentionRunsTheFlashKernel) {
  LoraSettings lora;
  lora.rank = 4;
  auto model = DecoderModel::Load(TinyModel("memory_attention", false), lora);
  ASSERT_TRUE(model.ok()) << model.status();
  at::AutoGradMode grad(true);
  at::Tensor tokens = at::arange(0, 40, at::kLong).remainder(64);
  at::Tensor h = (*model)->Hidden(tokens, {25, 15}, nullptr);
  std::map<std::string, int> names = NodeNames(h);
  const int layers = static_cast<int>((*model)->config().num_hidden_layers);
  EXPECT_EQ(names["ScaledDotProductFlashAttentionForCpuBackward0"], 2 * layers);
  EXPECT_EQ(names.count("SoftmaxBackward0"), 0u);
  EXPECT_EQ(names.count("BmmBackward0"), 0u);
}

lathe::v1::ForwardBackwardInput Batch(const std::vector<int>& lengths, int64_t vocab) {
  lathe::v1::ForwardBackwardInput in;
  in.set_loss_fn("cross_entropy");
  for (size_t d = 0; d < lengths.size(); ++d) {
    std::vector<int32_t> tokens;
    std::vector<int64_t> targets;
    for (int i = 0; i < lengths[d]; ++i) {
      tokens.push_back(static_cast<int32_t>((d * 31 + i * 7) % vocab));
      targets.push_back(i == 2 ? -100 : static_cast<int64_t>((d * 13 + i * 5 + 1) % vocab));
    }
    lathe::v1::Datum* datum = in.add_data();
    datum->mutable_model_input()->add_chunks()->mutable_encoded_text()->set_tokens(tokens.data(), tokens.size() * 4);
    lathe::v1::TensorData& t = (*datum->mutable_loss_fn_inputs())["target_tokens"];
    t.set_dtype(lathe::v1::INT64);
    t.add_shape(static_cast<int64_t>(targets.size()));
    t.set_data(targets.data(), targets.size() * 8);
  }
  return in;
}

struct RecomputeCase {
  bool moe;
  int lora_rank;  // 0: full fine-tuning
};

class RecomputeTest : public ::testing::TestWithParam<RecomputeCase> {};

// Two micro-batches (packed sequences, an ignored target), chunked logprobs:
// the same outputs, metrics and gradients bit for bit with and without
// recompute. The recomputed forward repeats the first one's operations on
// the same inputs, and each gradient is summed from the same terms in the
// same order.
TEST_P(RecomputeTest, GivesTheGradientsOfThePlainPass) {
  const RecomputeCase c = GetParam();
  const std::string dir = TinyModel(c.moe ? "memory_recompute_moe" : "memory_recompute_dense", c.moe);
  LoraSettings lora;
  lora.rank = c.lora_rank;
  lora.train_unembed = true;
  std::vector<std::unique_ptr<Trainer>> trainers;
  std::vector<lathe::v1::ForwardBackwardOutput> outs;
  for (Recompute mode : {Recompute::kOff, Recompute::kOn}) {
    TrainerOptions options{dir, lora, 64, /*micro_batch_tokens=*/24};
    options.logprob_chunk_tokens = 7;
    options.recompute = mode;
    auto t = Trainer::Create(options);
    ASSERT_TRUE(t.ok()) << t.status();
    at::manual_seed(5);
    at::NoGradGuard no_grad;
    for (TrainableParam& p : (*t)->model().trainable()) {
      if (p.name.find("lora_B") != std::string::npos) p.tensor.normal_(0.0, 0.05);
    }
    trainers.push_back(*std::move(t));
  }
  const auto in = Batch({9, 13, 20}, 64);
  for (auto& t : trainers) {
    auto out = t->ForwardBackward(in);
    ASSERT_TRUE(out.ok()) << out.status();
    outs.push_back(*out);
  }
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(outs[0], outs[1]));
  const auto& plain = trainers[0]->model().trainable();
  const auto& recomputed = trainers[1]->model().trainable();
  ASSERT_EQ(plain.size(), recomputed.size());
  int compared = 0;
  for (size_t i = 0; i < plain.size(); ++i) {
    const at::Tensor a = plain[i].tensor.grad(), b = recomputed[i].tensor.grad();
    ASSERT_EQ(a.defined(), b.defined()) << plain[i].name;
    if (!a.defined()) continue;
    EXPECT_TRUE(at::equal(a, b)) << plain[i].name << ": max diff " << (a - b).abs().max().item<float>();
    compared += a.abs().sum().item<float>() > 0;
  }
  EXPECT_GT(compared, static_cast<int>(plain.size()) / 2);
}

INSTANTIATE_TEST_SUITE_P(Models, RecomputeTest,
                         ::testing::Values(RecomputeCase{false, 4}, RecomputeCase{false, 0}, RecomputeCase{true, 4},
                                           RecomputeCase{true, 0}),
                         [](const auto& info) {
                           return std::string(info.param.moe ? "Moe" : "Dense") +
                                  (info.param.lora_rank > 0 ? "Lora" : "Full");
                         });

TEST(MemoryTest, RecomputeModeParses) {
  EXPECT_EQ(*ParseRecompute("auto"), Recompute::kAuto);
  EXPECT_EQ(*ParseRecompute("on"), Recompute::kOn);
  EXPECT_EQ(*ParseRecompute("off"), Recompute::kOff);
  EXPECT_FALSE(ParseRecompute("yes").ok());
}

}  // namespace
}  // namespace lathe::runtime
