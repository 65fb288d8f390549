// Batch and prompt checks shared by the coordinator and the runtime: token
// ids read from packed chunks.
#include "core/validation.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace lathe::runtime {
namespace {

void AddChunk(lathe::v1::ModelInput* input, const std::vector<int32_t>& tokens) {
  input->add_chunks()->mutable_encoded_text()->set_tokens(
      std::string(reinterpret_cast<const char*>(tokens.data()), tokens.size() * sizeof(int32_t)));
}

TEST(InputTokens, ConcatenatesChunksAndSkipsEmptyOnes) {
  // An empty chunk first: nothing to copy into an empty vector (under
  // UBSan, a copy from a null pointer is reported even of 0 bytes).
  lathe::v1::ModelInput input;
  AddChunk(&input, {});
  AddChunk(&input, {1, 2});
  AddChunk(&input, {});
  AddChunk(&input, {3});
  absl::StatusOr<std::vector<int32_t>> tokens = InputTokens(input);
  ASSERT_TRUE(tokens.ok()) << tokens.status();
  EXPECT_EQ(*tokens, (std::vector<int32_t>{1, 2, 3}));

  lathe::v1::ModelInput only_empty;
  AddChunk(&only_empty, {});
  ASSERT_TRUE(InputTokens(only_empty).ok());
  EXPECT_TRUE(InputTokens(only_empty)->empty());
}

TEST(InputTokens, RefusesPartialTokensAndOtherChunks) {
  lathe::v1::ModelInput input;
  input.add_chunks()->mutable_encoded_text()->set_tokens("abc");
  EXPECT_EQ(InputTokens(input).status().code(), absl::StatusCode::kInvalidArgument);
  lathe::v1::ModelInput no_text;
  no_text.add_chunks();
  EXPECT_EQ(InputTokens(no_text).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace lathe::runtime
