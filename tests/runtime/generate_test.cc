// GenerateBatch: a request decoded beside others gets bitwise the tokens and
// logprobs it gets alone (in float32 and in bfloat16); an invalid request
// fails alone.
#include "runtime/generate.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <limits>
#include <map>
#include <memory>
#include <tuple>

#include "runtime/decoder_model.h"
#include "runtime/tiny_model.h"
#include "runtime/trainer.h"

namespace lathe::runtime {
namespace {

SampleRequest Request(std::vector<int32_t> prompt, int n, double temperature, int64_t max_tokens, uint64_t seed) {
  SampleRequest r;
  r.prompt = std::move(prompt);
  r.num_samples = n;
  r.settings.temperature = temperature;
  r.settings.max_tokens = max_tokens;
  r.settings.seed = seed;
  return r;
}

// A trainer over a tiny model written to TempDir()/name, with LoRA rank 4.
std::unique_ptr<Trainer> TinyTrainer(const std::string& name, const TinyModelSpec& spec, bool train_unembed = false) {
  const std::string dir = ::testing::TempDir() + "/" + name;
  EXPECT_TRUE(WriteTinyModel(dir, spec).ok());
  LoraSettings lora;
  lora.rank = 4;
  lora.train_unembed = train_unembed;
  auto trainer = Trainer::Create({dir, lora, 64, 0});
  EXPECT_TRUE(trainer.ok()) << trainer.status();
  return trainer.ok() ? std::move(*trainer) : nullptr;
}

void ExpectSame(const Generation& a, const Generation& b, const std::string& what) {
  ASSERT_EQ(a.sequences.size(), b.sequences.size()) << what;
  for (size_t i = 0; i < a.sequences.size(); ++i) {
    EXPECT_EQ(a.sequences[i].tokens, b.sequences[i].tokens) << what << " sample " << i;
    // Bitwise: == on floats.
    EXPECT_EQ(a.sequences[i].logprobs, b.sequences[i].logprobs) << what << " sample " << i;
    EXPECT_EQ(a.sequences[i].stopped, b.sequences[i].stopped) << what << " sample " << i;
  }
}

// (MoE, dtype).
class GenerateBatchTest : public ::testing::TestWithParam<std::tuple<bool, Dtype>> {};

TEST_P(GenerateBatchTest, BatchedRequestsEqualLoneRequests) {
  const auto [moe, dtype] = GetParam();
  const std::string dir = ::testing::TempDir() + (moe ? "/generate_test_moe" : "/generate_test_dense");
  TinyModelSpec spec;
  spec.moe = moe;
  spec.vocab_size = 96;
  spec.hidden_size = 72;  // not a multiple of 16: the tail of every product
  ASSERT_TRUE(WriteTinyModel(dir, spec).ok());
  LoraSettings lora;
  lora.rank = 4;
  TrainerOptions options{dir, lora, 64, 0};
  options.dtype = dtype;
  auto trainer = Trainer::Create(options);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  at::manual_seed(7);
  for (TrainableParam& p : (*trainer)->model().trainable()) {
    at::NoGradGuard g;
    p.tensor.normal_(0.0, 0.05);
  }
  const DecoderModel& model = (*trainer)->model();
  std::vector<SampleRequest> requests = {
      Request({1, 2, 3}, 1, 0.0, 9, 0),        Request({5, 6, 7, 8, 9, 10}, 3, 1.0, 12, 11),
      Request({4}, 2, 0.7, 5, 12),             Request({}, 1, 1.0, 4, 0),  // invalid
      Request({30, 31, 32, 33}, 4, 1.0, 3, 13), Request({9, 9}, 1, 1.0, 7, 14)};
  requests[4].settings.top_k = 5;
  requests[5].settings.top_p = 0.6;
  requests[1].prompt_logprobs = true;
  requests[2].topk_prompt_logprobs = 3;
  std::vector<absl::StatusOr<Generation>> together = GenerateBatch(model, requests, 64);
  ASSERT_EQ(together.size(), requests.size());
  EXPECT_TRUE(absl::IsInvalidArgument(together[3].status())) << together[3].status();
  for (size_t r = 0; r < requests.size(); ++r) {
    if (r == 3) continue;
    ASSERT_TRUE(together[r].ok()) << together[r].status();
    const SampleRequest& q = requests[r];
    absl::StatusOr<Generation> alone =
        Generate(model, q.prompt, q.num_samples, q.settings, q.prompt_logprobs, 64, q.topk_prompt_logprobs);
    ASSERT_TRUE(alone.ok()) << alone.status();
    ExpectSame(*together[r], *alone, "request " + std::to_string(r));
    EXPECT_EQ(together[r]->prompt_logprobs.size(), q.prompt_logprobs ? q.prompt.size() : 0u);
    EXPECT_EQ(together[r]->topk_ids.size(), static_cast<size_t>(q.topk_prompt_logprobs * q.prompt.size()));
    for (const GeneratedSequence& s : together[r]->sequences) {
      EXPECT_EQ(static_cast<int64_t>(s.tokens.size()), q.settings.max_tokens);
    }
  }
  // In another order, with a different neighbour set: the same answers.
  std::vector<SampleRequest> reordered = {requests[5], requests[1], requests[0]};
  std::vector<absl::StatusOr<Generation>> again = GenerateBatch(model, reordered, 64);
  ExpectSame(*again[0], *together[5], "reordered 5");
  ExpectSame(*again[1], *together[1], "reordered 1");
  ExpectSame(*again[2], *together[0], "reordered 0");
}

TEST(DecodeTest, RequestsThatJoinMidwayEqualLoneRequests) {
  TinyModelSpec spec;
  spec.vocab_size = 96;
  std::unique_ptr<Trainer> trainer = TinyTrainer("decode_test_moe", spec);
  ASSERT_NE(trainer, nullptr);
  const DecoderModel& model = trainer->model();
  std::vector<SampleRequest> first = {Request({1, 2, 3}, 2, 1.0, 12, 1)};
  // After steps 2 and 5: two more, then an invalid one and a short one.
  std::map<int, std::vector<SampleRequest>> later = {
      {2, {Request({7, 8}, 1, 0.0, 6, 2), Request({4, 5, 6, 7}, 3, 1.0, 20, 3)}},
      {5, {Request({}, 1, 1.0, 3, 4), Request({11}, 1, 1.0, 2, 5)}}};
  std::vector<SampleRequest> all = first;
  for (auto& [step, reqs] : later) all.insert(all.end(), reqs.begin(), reqs.end());
  int step = 0;
  std::vector<int> decoding_seen;
  std::map<size_t, absl::StatusOr<Generation>> results;
  std::vector<size_t> finish_order;
  DecodeHooks hooks;
  hooks.join = [&](int decoding) {
    decoding_seen.push_back(decoding);
    auto it = later.find(++step);
    return it == later.end() ? std::vector<SampleRequest>() : it->second;
  };
  hooks.done = [&](size_t k, absl::StatusOr<Generation> g) {
    finish_order.push_back(k);
    results.emplace(k, std::move(g));
  };
  Decode(model, first, 64, hooks);
  ASSERT_EQ(results.size(), all.size());
  EXPECT_EQ(decoding_seen[0], 2);  // the first request's two samples
  EXPECT_EQ(decoding_seen[2], 6);  // then four more joined
  EXPECT_TRUE(absl::IsInvalidArgument(results.at(3).status()));
  // The two-token request finished before the first one: answers go out as
  // requests finish.
  auto finished = [&](size_t k) { return std::find(finish_order.begin(), finish_order.end(), k); };
  EXPECT_LT(finished(4), finished(0));
  for (size_t k = 0; k < all.size(); ++k) {
    if (k == 3) continue;
    ASSERT_TRUE(results.at(k).ok()) << k << " " << results.at(k).status();
    const SampleRequest& q = all[k];
    absl::StatusOr<Generation> alone = Generate(model, q.prompt, q.num_samples, q.settings, false, 64);
    ASSERT_TRUE(alone.ok());
    ExpectSame(*results.at(k), *alone, "request " + std::to_string(k));
    EXPECT_EQ(alone->batched_requests, 1);
  }
  // Requests 0, 1, 2 and 4 decoded together at steps 6 and 7 (3 was refused).
  EXPECT_EQ(results.at(1)->batched_requests, 4);
  EXPECT_EQ(results.at(4)->batched_requests, 4);
  EXPECT_EQ(results.at(0)->batched_requests, 4);
}

// A prompt token outside the vocabulary (either end, INT32_MIN/MAX) fails its
// request alone with a clear error; the others decode.
TEST(DecodeTest, APromptTokenOutsideTheVocabularyFailsAlone) {
  TinyModelSpec spec;
  spec.vocab_size = 50;
  std::unique_ptr<Trainer> trainer = TinyTrainer("generate_test_vocab", spec);
  ASSERT_NE(trainer, nullptr);
  const DecoderModel& model = trainer->model();
  std::vector<SampleRequest> requests = {Request({1, 2, 49}, 1, 0.0, 4, 1), Request({1, 50}, 1, 0.0, 4, 2),
                                         Request({-1}, 1, 0.0, 4, 3),
                                         Request({std::numeric_limits<int32_t>::max()}, 1, 0.0, 4, 4),
                                         Request({std::numeric_limits<int32_t>::min(), 3}, 1, 0.0, 4, 5)};
  std::vector<absl::StatusOr<Generation>> out = GenerateBatch(model, requests, 64);
  ASSERT_EQ(out.size(), requests.size());
  ASSERT_TRUE(out[0].ok()) << out[0].status();
  EXPECT_EQ(out[0]->sequences.at(0).tokens.size(), 4u);
  for (size_t r = 1; r < requests.size(); ++r) {
    EXPECT_TRUE(absl::IsInvalidArgument(out[r].status())) << r << ": " << out[r].status();
    EXPECT_NE(out[r].status().message().find("outside the vocabulary [0, 50)"), std::string::npos) << out[r].status();
  }
}

// A request whose next-token distribution is not finite (logits / temperature
// overflow float32) fails alone; the requests decoding beside it finish.
TEST(DecodeTest, ARequestWithoutAFiniteDistributionFailsAlone) {
  std::unique_ptr<Trainer> trainer = TinyTrainer("generate_test_overflow", TinyModelSpec{}, /*train_unembed=*/true);
  ASSERT_NE(trainer, nullptr);
  at::manual_seed(3);
  bool unembed = false;
  for (TrainableParam& p : trainer->model().trainable()) {
    at::NoGradGuard g;
    p.tensor.normal_(0.0, 0.05);
    // Logits near 1e31: finite, but not once divided by 1e-8.
    if (p.name.find("lm_head") != std::string::npos && p.name.find("lora_B") != std::string::npos) {
      p.tensor.normal_(0.0, 1e32);
      unembed = true;
    }
  }
  ASSERT_TRUE(unembed);
  const DecoderModel& model = trainer->model();
  std::vector<SampleRequest> requests = {Request({1, 2, 3}, 2, 1.0, 6, 1), Request({4, 5}, 2, 1e-8, 6, 2),
                                         Request({7, 8, 9}, 1, 0.0, 6, 3)};
  std::vector<absl::StatusOr<Generation>> out = GenerateBatch(model, requests, 64);
  ASSERT_EQ(out.size(), 3u);
  EXPECT_TRUE(absl::IsInvalidArgument(out[1].status())) << out[1].status();
  EXPECT_NE(out[1].status().message().find("not finite in float32 at temperature 1e-08"), std::string::npos)
      << out[1].status();
  for (size_t r : {size_t{0}, size_t{2}}) {
    ASSERT_TRUE(out[r].ok()) << r << ": " << out[r].status();
    for (const GeneratedSequence& s : out[r]->sequences) EXPECT_EQ(s.tokens.size(), 6u);
  }
}

INSTANTIATE_TEST_SUITE_P(DenseAndMoe, GenerateBatchTest,
                         ::testing::Combine(::testing::Bool(), ::testing::Values(Dtype::kFloat32, Dtype::kBFloat16)));

}  // namespace
}  // namespace lathe::runtime
