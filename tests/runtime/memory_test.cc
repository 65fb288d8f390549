// What bounds a training step's memory: attention whose backward keeps no
// [T, T] scores.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/function.h>

#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "runtime/decoder_model.h"
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

std::string DenseModel(const std::string& name) {
  TinyModelSpec spec;
  spec.moe = false;
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
  auto model = DecoderModel::Load(DenseModel("memory_attention"), lora);
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

}  // namespace
}  // namespace lathe::runtime
