// GLM-5's sparse attention in decoding: the indexer's keys are cached beside
// the latent in the layers that run an indexer (not in those that share one),
// and continuing from the cache past index_topk selects as one pass over all
// the tokens does.
#include "runtime/sparse_indexer.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "nlohmann/json.hpp"
#include "runtime/decoder_model.h"
#include "runtime/tiny_model.h"

namespace lathe::runtime {
namespace {

TEST(SparseIndexerTest, DecodingCachesIndexKeysAndSelectsAsOnePass) {
  const std::string dir = ::testing::TempDir() + "/sparse_indexer_test";
  TinyModelSpec spec;
  spec.latent_attention = spec.sparse_attention = true;
  spec.num_layers = 3;
  ASSERT_TRUE(WriteTinyModel(dir, spec).ok());
  LoraSettings frozen;
  frozen.train_attn = frozen.train_mlp = frozen.train_unembed = false;
  auto model = DecoderModel::Load(dir, frozen);
  ASSERT_TRUE(model.ok()) << model.status();
  const ModelConfig& c = (*model)->config();
  ASSERT_EQ(c.sparse_indexer.index_topk, 8);
  ASSERT_EQ(c.sparse_indexer.selection_layer, (std::vector<int64_t>{0, 0, 2}));
  at::NoGradGuard no_grad;
  const int64_t n = 20;
  at::Tensor tokens = at::randint(spec.vocab_size, {n}, at::TensorOptions().dtype(at::kLong));
  at::Tensor whole = (*model)->Hidden(tokens, {n}, nullptr);
  // A prompt of 6 (within index_topk), then one token at a time well past it.
  std::vector<SequenceState> states(1);
  std::vector<at::Tensor> rows = {(*model)->Hidden(tokens.narrow(0, 0, 6), {6}, nullptr, &states)};
  for (int64_t i = 6; i < n; ++i) rows.push_back((*model)->Hidden(tokens.narrow(0, i, 1), {1}, nullptr, &states));
  at::Tensor decoded = at::cat(rows, 0);
  EXPECT_LE((decoded - whole).abs().max().item<double>(), 1e-5 * whole.abs().max().item<double>());
  ASSERT_EQ(states[0].layers.size(), 3u);
  for (size_t layer = 0; layer < 3; ++layer) {
    const std::vector<at::Tensor>& slot = states[0].layers[layer];
    EXPECT_EQ(slot[0].sizes(), (std::vector<int64_t>{n, c.latent_attention.kv_lora_rank}));
    if (layer == 1) {
      EXPECT_EQ(slot.size(), 2u);  // shares layer 0's selection: no indexer keys
    } else {
      ASSERT_EQ(slot.size(), 3u);
      EXPECT_EQ(slot[2].sizes(), (std::vector<int64_t>{n, c.sparse_indexer.index_head_dim}));
    }
  }
}

TEST(SparseIndexerTest, LongSequencesAttendToFewerKeys) {
  // The same folder with index_topk raised past the sequence (every key
  // kept): the first index_topk tokens, which see all their keys either way,
  // are unchanged (up to the masked kernel's rounding), later ones are not.
  const std::string sparse_dir = ::testing::TempDir() + "/sparse_indexer_test_topk";
  const std::string dense_dir = ::testing::TempDir() + "/sparse_indexer_test_dense";
  TinyModelSpec spec;
  spec.latent_attention = spec.sparse_attention = true;
  spec.num_layers = 2;
  ASSERT_TRUE(WriteTinyModel(sparse_dir, spec).ok());
  std::filesystem::remove_all(dense_dir);
  std::filesystem::copy(sparse_dir, dense_dir);
  nlohmann::json config = nlohmann::json::parse(std::ifstream(dense_dir + "/config.json"));
  config["index_topk"] = 64;
  std::ofstream(dense_dir + "/config.json") << config.dump();
  LoraSettings frozen;
  frozen.train_attn = frozen.train_mlp = frozen.train_unembed = false;
  auto sparse = DecoderModel::Load(sparse_dir, frozen);
  auto dense = DecoderModel::Load(dense_dir, frozen);
  ASSERT_TRUE(sparse.ok()) << sparse.status();
  ASSERT_TRUE(dense.ok()) << dense.status();
  at::NoGradGuard no_grad;
  at::Tensor tokens = at::randint(spec.vocab_size, {16}, at::TensorOptions().dtype(at::kLong));
  at::Tensor a = (*sparse)->Hidden(tokens, {16}, nullptr), b = (*dense)->Hidden(tokens, {16}, nullptr);
  const double scale = b.abs().max().item<double>();
  EXPECT_LE((a.narrow(0, 0, 8) - b.narrow(0, 0, 8)).abs().max().item<double>(), 1e-5 * scale);
  EXPECT_GT((a.narrow(0, 8, 8) - b.narrow(0, 8, 8)).abs().max().item<double>(), 1e-3 * scale);
}

TEST(SparseIndexerTest, MaskIsBuiltFromTheKeptIndices) {
  // Queries at positions 2, 3, 4 of their sequence keep their top-3 keys;
  // the first query's top includes keys past it (scored -inf: fewer than
  // top-k earlier keys), which its mask leaves out.
  KeySelection s;
  s.first = 2;
  s.queries = 3;
  s.masked = true;
  s.top = at::tensor({2, 0, 4, 3, 1, 0, 4, 2, 1}, at::TensorOptions().dtype(at::kInt)).view({3, 3});
  at::Tensor mask = KeyMask(s, at::kCPU);
  at::Tensor expected = at::tensor({1, 0, 1, 0, 0,  //
                                    1, 1, 0, 1, 0,  //
                                    0, 1, 1, 0, 1})
                            .view({3, 5})
                            .to(at::kBool);
  EXPECT_TRUE(at::equal(mask, expected)) << mask;
  // Every earlier key, as a mask (a cp chunk whose sequence others select in).
  s.top = at::Tensor();
  EXPECT_TRUE(at::equal(KeyMask(s, at::kCPU), at::ones({3, 5}, at::kBool).tril(2)));
  // Not masked: plain causal attention, no mask.
  s.masked = false;
  EXPECT_FALSE(KeyMask(s, at::kCPU).defined());
}

}  // namespace
}  // namespace lathe::runtime
