// Loops wire bodies <-> lathe.v1: what the Loops SDK sends becomes the op
// lathe runs, and results come back in the shapes the SDK validates.
#include "http/loops_convert.h"

#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

namespace lathe::http {
namespace {

using nlohmann::json;

template <class T>
std::string Pack(std::vector<T> values) {
  return std::string(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(T));
}

TEST(LoopsConvert, PathsMapBothWays) {
  EXPECT_EQ(BtPath("lathe://run-1/weights/s1"), "bt://loops:run-1/weights/s1");
  EXPECT_EQ(LatheFromBt("bt://loops:run-1/sampler_weights/p"), "lathe://run-1/sampler_weights/p");
  EXPECT_EQ(LatheFromBt("s3://bucket/x"), "");
  EXPECT_EQ(BtPath("elsewhere"), "elsewhere");
}

TEST(LoopsConvert, ForwardBackwardBodyBecomesOp) {
  const json body = json::parse(R"({
    "data": [{"model_input": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
              "loss_fn_inputs": {"target_tokens": {"data": [2, 3, 4], "dtype": "int64", "shape": [3]}},
              "routed_experts_ref": null}],
    "loss_fn": "cross_entropy", "loss_fn_config": null, "seq_id": 2, "run_id": null,
    "top_k_logprobs": 0, "model": "m"})");
  lathe::v1::SubmitRequest op;
  ASSERT_TRUE(LoopsForwardBackwardFromJson(body, false, "run-1", 1, &op).ok());
  EXPECT_EQ(op.run_id(), "run-1");
  EXPECT_EQ(op.seq_id(), 1);
  ASSERT_TRUE(op.has_forward_backward());
  const lathe::v1::Datum& d = op.forward_backward().data(0);
  EXPECT_EQ(d.model_input().chunks(0).encoded_text().tokens(), Pack<int32_t>({1, 2, 3}));
  EXPECT_EQ(d.loss_fn_inputs().at("target_tokens").data(), Pack<int64_t>({2, 3, 4}));

  json experts = body;
  experts["data"][0]["routed_experts_ref"] = {{"uri", "bt://loops:r/sequences/1"}, {"version", 1}};
  json topk = body;
  topk["top_k_logprobs"] = 5;
  for (const json& bad : {experts, topk}) {
    lathe::v1::SubmitRequest refused;
    EXPECT_EQ(LoopsForwardBackwardFromJson(bad, true, "run-1", 1, &refused).code(),
              absl::StatusCode::kInvalidArgument);
  }
}

TEST(LoopsConvert, OutputCarriesLossPerTokenAndShapes) {
  lathe::v1::ForwardBackwardOutput out;
  (*out.mutable_metrics())["loss:sum"] = 6.0;
  (*out.mutable_metrics())["num_loss_tokens:sum"] = 3.0;
  lathe::v1::TensorData& lp = (*out.add_loss_fn_outputs()->mutable_tensors())["logprobs"];
  lp.set_dtype(lathe::v1::FLOAT32);
  lp.add_shape(2);
  lp.set_data(Pack<float>({-1.5f, NAN}));
  const json j = LoopsForwardBackwardOutput(out);
  EXPECT_EQ(j.at("loss"), 2.0);
  EXPECT_EQ(j.at("metrics").at("loss:sum"), 6.0);
  const json& t = j.at("loss_fn_outputs")[0].at("logprobs");
  EXPECT_EQ(t.at("shape"), json::array({2}));
  EXPECT_EQ(t.at("data")[0], -1.5);
  EXPECT_TRUE(t.at("data")[1].is_null());  // masked: NaN travels as null
}

TEST(LoopsConvert, SampleBodyBecomesOp) {
  const json body = json::parse(R"({"prompt": [5, 6], "n": 2, "temperature": 0.5, "top_p": 0.9, "top_k": 0,
    "max_tokens": 4, "seed": 7, "logprobs": 0, "return_tokens_as_token_ids": true, "stop_token_ids": [9],
    "prompt_logprobs": 2})");
  lathe::v1::SampleOp op;
  ASSERT_TRUE(LoopsSampleFromJson(body, &op).ok());
  EXPECT_EQ(op.prompt().chunks(0).encoded_text().tokens(), Pack<int32_t>({5, 6}));
  EXPECT_EQ(op.num_samples(), 2);
  EXPECT_FLOAT_EQ(op.params().temperature(), 0.5f);
  EXPECT_FALSE(op.params().has_top_k());  // 0: off, not sent on
  EXPECT_EQ(op.params().max_tokens(), 4);
  EXPECT_EQ(op.params().seed(), 7u);
  ASSERT_EQ(op.params().stop_tokens_size(), 1);
  EXPECT_TRUE(op.include_prompt_logprobs());
  EXPECT_EQ(op.topk_prompt_logprobs(), 2);

  for (const char* bad : {R"({"prompt": [1], "stop": "\n"})", R"({"prompt": [1], "logprobs": 3})",
                          R"({"prompt": [], "model_input_chunks": [{"type": "image"}]})",
                          R"({"prompt": [1], "structured_outputs": {"json": {}}})"}) {
    lathe::v1::SampleOp refused;
    EXPECT_EQ(LoopsSampleFromJson(json::parse(bad), &refused).code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

TEST(LoopsConvert, CompletionHasTheOpenAiShape) {
  lathe::v1::SampleOp op;
  op.mutable_prompt()->add_chunks()->mutable_encoded_text()->set_tokens(Pack<int32_t>({5, 6, 7}));
  op.set_include_prompt_logprobs(true);
  lathe::v1::SampleResult result;
  lathe::v1::SampledSequence* seq = result.add_sequences();
  seq->set_tokens(Pack<int32_t>({8, 9}));
  seq->set_logprobs(Pack<float>({-0.25f, -0.5f}));
  seq->set_stop_reason(lathe::v1::STOP);
  result.add_sequences()->set_stop_reason(lathe::v1::LENGTH);
  result.set_prompt_logprobs(Pack<float>({NAN, -1.0f, -2.0f}));
  const json j = LoopsCompletion(op, result, "m");
  ASSERT_EQ(j.at("choices").size(), 2u);
  const json& c = j.at("choices")[0];
  EXPECT_EQ(c.at("token_ids"), json::array({8, 9}));
  EXPECT_EQ(c.at("logprobs").at("token_logprobs"), json::array({-0.25, -0.5}));
  EXPECT_EQ(c.at("finish_reason"), "stop");
  EXPECT_EQ(j.at("choices")[1].at("finish_reason"), "length");
  EXPECT_EQ(c.at("prompt_token_ids"), json::array({5, 6, 7}));
  const json& prompt = c.at("prompt_logprobs");
  ASSERT_EQ(prompt.size(), 3u);
  EXPECT_TRUE(prompt[0].is_null());
  EXPECT_EQ(prompt[2].at("7").at("logprob"), -2.0);  // keyed by the actual token's id
}

}  // namespace
}  // namespace lathe::http
