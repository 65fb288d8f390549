// The split of packed sequences over a cp group: balanced causal work (chunk
// i and 2·cp−1−i), every row on exactly one member, short sequences leaving
// members empty, and the per-sequence restriction used to gather outputs.
#include "parallel/context_parallel.h"

#include <gtest/gtest.h>

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

}  // namespace
}  // namespace lathe::parallel
