// LatentAttention decoding: a sequence's state holds the latent and the rope
// key per layer (not per-head keys and values), and continuing from it gives
// the hidden states of one pass over all the tokens.
#include "runtime/latent_attention.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>

#include "runtime/decoder_model.h"
#include "runtime/tiny_model.h"

namespace lathe::runtime {
namespace {

TEST(LatentAttentionTest, DecodingCachesTheLatentAndContinuesThePass) {
  const std::string dir = ::testing::TempDir() + "/latent_attention_test";
  TinyModelSpec spec;
  spec.latent_attention = true;
  spec.num_layers = 3;
  ASSERT_TRUE(WriteTinyModel(dir, spec).ok());
  LoraSettings frozen;
  frozen.train_attn = frozen.train_mlp = frozen.train_unembed = false;
  auto model = DecoderModel::Load(dir, frozen);
  ASSERT_TRUE(model.ok()) << model.status();
  const ModelConfig& c = (*model)->config();
  ASSERT_EQ(c.latent_attention.kv_lora_rank, 16);
  at::NoGradGuard no_grad;
  at::Tensor tokens = at::randint(spec.vocab_size, {9}, at::TensorOptions().dtype(at::kLong));
  at::Tensor whole = (*model)->Hidden(tokens, {9}, nullptr);
  // A prompt of 6, then one token at a time.
  std::vector<SequenceState> states(1);
  std::vector<at::Tensor> rows = {(*model)->Hidden(tokens.narrow(0, 0, 6), {6}, nullptr, &states)};
  for (int64_t i = 6; i < 9; ++i) {
    ASSERT_EQ(states[0].length, i);
    rows.push_back((*model)->Hidden(tokens.narrow(0, i, 1), {1}, nullptr, &states));
  }
  at::Tensor decoded = at::cat(rows, 0);
  EXPECT_LE((decoded - whole).abs().max().item<double>(), 1e-5 * whole.abs().max().item<double>());
  ASSERT_EQ(states[0].layers.size(), static_cast<size_t>(spec.num_layers));
  for (const std::vector<at::Tensor>& slot : states[0].layers) {
    ASSERT_EQ(slot.size(), 2u);
    EXPECT_EQ(slot[0].sizes(), (std::vector<int64_t>{9, c.latent_attention.kv_lora_rank}));
    EXPECT_EQ(slot[1].sizes(), (std::vector<int64_t>{9, c.latent_attention.qk_rope_head_dim}));
  }
}

}  // namespace
}  // namespace lathe::runtime
