// The split of packed sequences over a cp group: balanced causal work (chunk
// i and 2·cp−1−i), every row on exactly one member, short sequences leaving
// members empty, the per-sequence restriction used to gather outputs, and
// the attention of a sparse selection given per chunk.
#include "parallel/context_parallel.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <optional>
#include <vector>

namespace lathe::parallel {
namespace {

TEST(SplitSequencesTest, LoadBalancedChunksOfOneSequence) {
  // 16 tokens over cp 2: four chunks of 4; member 0 holds 0 and 3, member 1 holds 1 and 2.
  SequenceSplit s0 = SplitSequences({16}, 2, 0), s1 = SplitSequences({16}, 2, 1);
  EXPECT_EQ(s0.own(), (std::vector<int64_t>{0, 1, 2, 3, 12, 13, 14, 15}));
  EXPECT_EQ(s1.own(), (std::vector<int64_t>{4, 5, 6, 7, 8, 9, 10, 11}));
  EXPECT_EQ(s0.rows, s1.rows);  // every member knows every member's rows
  ASSERT_EQ(s0.chunks.size(), 2u);
  EXPECT_EQ(s0.chunks[1].begin, 12);
  EXPECT_EQ(s0.chunks[1].local, 4);
  EXPECT_EQ(s0.positions, s0.own());
  // Causal work (sum of key-prefix lengths) is equal: 4+16 vs 8+12 chunk ends.
  int64_t w0 = 0, w1 = 0;
  for (const auto& c : s0.chunks) w0 += c.length * (c.begin + c.length);
  for (const auto& c : s1.chunks) w1 += c.length * (c.begin + c.length);
  EXPECT_EQ(w0, 4 * 4 + 4 * 16);
  EXPECT_EQ(w1, 4 * 8 + 4 * 12);
}

TEST(SplitSequencesTest, PackedShortSequencesCoverEveryRowOnce) {
  const std::vector<int64_t> lengths = {5, 1, 3, 0, 9};  // 1 and 3 are shorter than 2·cp
  const int cp = 4;
  std::vector<int> seen(18, 0);
  for (int r = 0; r < cp; ++r) {
    SequenceSplit s = SplitSequences(lengths, cp, r);
    EXPECT_EQ(s.total, 18);
    EXPECT_EQ(s.positions.size(), s.own().size());
    for (int64_t row : s.own()) ++seen[row];
    int64_t local = 0;
    for (const auto& c : s.chunks) {
      EXPECT_GT(c.length, 0);
      EXPECT_EQ(c.local, local);
      local += c.length;
    }
    EXPECT_EQ(local, static_cast<int64_t>(s.own().size()));
  }
  for (int n : seen) EXPECT_EQ(n, 1);
  // The one-token sequence (row 5) lies on the member holding the last chunk: 0.
  EXPECT_EQ(SplitSequences({1}, cp, 0).own(), (std::vector<int64_t>{0}));
  EXPECT_TRUE(SplitSequences({1}, cp, 1).own().empty());
}

TEST(SplitSequencesTest, RestrictRenumbersOneSequence) {
  SequenceSplit s = SplitSequences({5, 8}, 2, 1);
  SequenceSplit second = s.Restrict(5, 8);
  EXPECT_EQ(second.total, 8);
  EXPECT_EQ(second.own(), (std::vector<int64_t>{2, 3, 4, 5}));
  EXPECT_EQ(second.rows[0], (std::vector<int64_t>{0, 1, 6, 7}));
  EXPECT_EQ(s.LocalBegin(5), 2);  // member 1 holds rows 1 and 2 of the first sequence
}

TEST(ContextParallelAttentionTest, ChunkMasksSelectTheKeysEachQuerySees) {
  // One member (no communicator): each sequence's two chunks, the later one
  // over its prefix. The first sequence attends to a random selection of
  // earlier keys given per chunk; the second, without masks, causally.
  at::manual_seed(5);
  const std::vector<int64_t> lengths = {11, 3};
  const SequenceSplit split = SplitSequences(lengths, 1, 0);
  ASSERT_EQ(split.chunks.size(), 4u);
  const double scale = 0.3;
  at::Tensor q = at::randn({2, 14, 8}).requires_grad_(), k = at::randn({2, 14, 8}).requires_grad_();
  at::Tensor v = at::randn({2, 14, 8}).requires_grad_(), w = at::randn({2, 14, 8});
  at::Tensor selected = at::rand({11, 11}).lt(0.4).tril().logical_or(at::eye(11, at::kBool));
  std::vector<at::Tensor> masks;
  for (const SequenceSplit::Chunk& c : split.chunks) {
    masks.push_back(c.seq_offset == 0 ? selected.narrow(0, c.begin, c.length).narrow(1, 0, c.begin + c.length)
                                      : at::Tensor());
  }
  at::Tensor o = ContextParallelAttention(q, k, v, split, scale, /*gqa=*/false, Group{}, masks);
  auto grads_of = [&](const at::Tensor& out) {
    for (at::Tensor* t : {&q, &k, &v}) t->mutable_grad() = at::Tensor();
    (out * w).sum().backward();
    return std::vector<at::Tensor>{q.grad(), k.grad(), v.grad()};
  };
  const std::vector<at::Tensor> grads = grads_of(o);

  auto part = [](const at::Tensor& t, int64_t b, int64_t n) { return t.narrow(1, b, n).unsqueeze(0); };
  at::Tensor first = at::scaled_dot_product_attention(part(q, 0, 11), part(k, 0, 11), part(v, 0, 11), selected, 0.0,
                                                      false, scale);
  at::Tensor second = at::scaled_dot_product_attention(part(q, 11, 3), part(k, 11, 3), part(v, 11, 3),
                                                       std::nullopt, 0.0, true, scale);
  at::Tensor expected = at::cat({first, second}, 2).squeeze(0);
  const std::vector<at::Tensor> expected_grads = grads_of(expected);
  EXPECT_TRUE(at::allclose(o, expected, 1e-5, 1e-6));
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(at::allclose(grads[i], expected_grads[i], 1e-5, 1e-6)) << i;
  // A selection that differs from causal changes the result.
  EXPECT_FALSE(at::allclose(o, ContextParallelAttention(q, k, v, split, scale, false, Group{}), 1e-3, 1e-3));
}

}  // namespace
}  // namespace lathe::parallel
