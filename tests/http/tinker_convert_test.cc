// Tinker wire bodies <-> lathe.v1: what the SDK sends becomes the op lathe
// runs, and results come back in the layout the SDK decodes.
#include "http/tinker_convert.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

namespace lathe::http {
namespace {

template <class T>
std::string Pack(std::vector<T> values) {
  return std::string(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(T));
}

TEST(TinkerConvert, ProtoRequestBecomesForwardBackwardOp) {
  tinker::ForwardBackwardRequest request;
  request.set_model_id("run-1");
  request.set_seq_id(7);
  request.set_loss_fn("ppo");
  (*request.mutable_loss_fn_config())["clip_low_threshold"] = 0.5;
  (*request.mutable_loss_fn_config_v2())["clip_low_threshold"].set_number(0.7);
  tinker::Datum* datum = request.add_data();
  datum->add_model_input()->mutable_encoded_text()->set_tokens(Pack<int32_t>({1, 2, 3}));
  tinker::Tensor& targets = (*datum->mutable_loss_fn_inputs())["target_tokens"];
  targets.set_dtype(tinker::DTYPE_INT64);
  targets.add_shape(3);
  targets.set_dense(Pack<int64_t>({2, 3, 4}));

  lathe::v1::SubmitRequest op;
  ASSERT_TRUE(ForwardBackwardFromProto(request, &op).ok());
  EXPECT_EQ(op.run_id(), "run-1");
  EXPECT_EQ(op.seq_id(), 7);
  ASSERT_TRUE(op.has_forward_backward());
  EXPECT_EQ(op.forward_backward().loss_fn(), "ppo");
  EXPECT_EQ(op.forward_backward().loss_fn_config().at("clip_low_threshold"), 0.7);  // v2 wins
  const lathe::v1::Datum& out = op.forward_backward().data(0);
  EXPECT_EQ(out.model_input().chunks(0).encoded_text().tokens(), Pack<int32_t>({1, 2, 3}));
  const lathe::v1::TensorData& t = out.loss_fn_inputs().at("target_tokens");
  EXPECT_EQ(t.dtype(), lathe::v1::INT64);
  EXPECT_EQ(t.data(), Pack<int64_t>({2, 3, 4}));

  request.set_forward_only(true);
  lathe::v1::SubmitRequest forward;
  ASSERT_TRUE(ForwardBackwardFromProto(request, &forward).ok());
  EXPECT_TRUE(forward.has_forward());
}

TEST(TinkerConvert, RefusesWhatLatheCannotRun) {
  tinker::ForwardBackwardRequest image;
  image.add_data()->add_model_input()->mutable_image()->set_format("png");
  tinker::ForwardBackwardRequest sparse;
  (*sparse.add_data()->mutable_loss_fn_inputs())["weights"].mutable_sparse_csr();
  tinker::ForwardBackwardRequest text;
  (*text.mutable_loss_fn_config_v2())["mode"].set_text("x");
  tinker::ForwardBackwardRequest spans;
  spans.add_data()->add_loss_fn_input_spans();
  for (const auto* request : {&image, &sparse, &text, &spans}) {
    lathe::v1::SubmitRequest op;
    EXPECT_EQ(ForwardBackwardFromProto(*request, &op).code(), absl::StatusCode::kInvalidArgument);
  }
}

TEST(TinkerConvert, OutputIsOneRecordPerDatumWithByteOffsets) {
  lathe::v1::ForwardBackwardOutput output;
  output.set_loss_fn_output_type("ArrayRecord");
  (*output.mutable_metrics())["loss:sum"] = 1.5;
  for (int n : {2, 3}) {
    lathe::v1::TensorData& lp = (*output.add_loss_fn_outputs()->mutable_tensors())["logprobs"];
    lp.set_dtype(lathe::v1::FLOAT32);
    lp.add_shape(n);
    lp.set_data(Pack<float>(std::vector<float>(n, -0.25f)));
  }
  tinker::ForwardBackwardOutput wire;
  ASSERT_TRUE(wire.ParseFromString(ForwardBackwardOutputToProto(output)));
  EXPECT_EQ(wire.metrics().at("loss:sum"), 1.5);
  ASSERT_EQ(wire.loss_fn_outputs_size(), 2);
  const tinker::BatchedTensor& second = wire.loss_fn_outputs(1).fields().at("logprobs");
  EXPECT_EQ(wire.loss_fn_outputs(1).num_datums(), 1);
  EXPECT_EQ(second.dtype(), tinker::DTYPE_FLOAT32);
  EXPECT_EQ(second.offsets(), Pack<int64_t>({0, 12}));
  EXPECT_EQ(second.data(), Pack<float>({-0.25f, -0.25f, -0.25f}));
  EXPECT_EQ(second.trailing_shape_size(), 0);
}

TEST(TinkerConvert, JsonRequestAndAdamParams) {
  auto body = nlohmann::json::parse(R"({"model_id": "r", "seq_id": 2, "forward_backward_input": {
      "loss_fn": "cross_entropy", "data": [{"model_input": {"chunks": [{"type": "encoded_text", "tokens": [5, 6]}]},
      "loss_fn_inputs": {"target_tokens": {"data": [6, 7], "dtype": "int64"}}}]}})");
  lathe::v1::SubmitRequest op;
  ASSERT_TRUE(ForwardBackwardFromJson(body, /*forward_only=*/false, &op).ok());
  EXPECT_EQ(op.forward_backward().data(0).loss_fn_inputs().at("target_tokens").shape(0), 2);
  EXPECT_THROW(ForwardBackwardFromJson(nlohmann::json::parse(R"({"model_id": 1})"), false, &op),
               nlohmann::json::exception);
  auto wide = nlohmann::json::parse(R"({"model_id": "r", "seq_id": 2, "forward_backward_input": {
      "loss_fn": "cross_entropy", "data": [{"model_input": {"chunks": [{"tokens": [4294967297]}]},
      "loss_fn_inputs": {}}]}})");
  lathe::v1::SubmitRequest wrapped;
  EXPECT_EQ(ForwardBackwardFromJson(wide, false, &wrapped).code(), absl::StatusCode::kInvalidArgument);
  lathe::v1::AdamParams adam = AdamFromJson(nlohmann::json::parse(R"({"learning_rate": 0.01})"));
  EXPECT_EQ(adam.learning_rate(), 0.01);
  EXPECT_FALSE(adam.has_eps());  // absent: lathe's default
  // null is how the SDK serialises NaN or infinity: refused, never a default.
  EXPECT_THROW(AdamFromJson(nlohmann::json::parse(R"({"learning_rate": 0.01, "eps": null})")),
               nlohmann::json::type_error);
  EXPECT_THROW(AdamFromJson(nlohmann::json::parse(R"([0.01])")), nlohmann::json::type_error);
}

// What sample() and compute_logprobs() send becomes a SampleOp on the
// session's weights; token-id stops become one-token stop sequences.
TEST(TinkerConvert, BodiesNestedTooDeepAreRefusedAsTheyParse) {
  // Copying or walking a million-deep value recurses a million frames deep.
  const int deep = 1 << 20;
  const std::string brackets = std::string(deep, '[') + std::string(deep, ']');
  EXPECT_THROW(ParseJsonBody(brackets), nlohmann::json::out_of_range);
  EXPECT_THROW(ParseJsonBody("{\"data\": " + brackets + "}"), nlohmann::json::out_of_range);
  const int limit = kMaxJsonBodyDepth + 1;  // the outermost value is depth 0
  EXPECT_NO_THROW(ParseJsonBody(std::string(limit, '[') + std::string(limit, ']')));
  EXPECT_THROW(ParseJsonBody(std::string(limit + 1, '[') + std::string(limit + 1, ']')),
               nlohmann::json::out_of_range);
  EXPECT_THROW(ParseJsonBody("{\"model_id\": "), nlohmann::json::parse_error);
  const nlohmann::json body = ParseJsonBody(
      R"({"model_id": "run-1", "seq_id": 2, "forward_backward_input": {"loss_fn": "cross_entropy", "data": [)"
      R"({"model_input": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]}, "loss_fn_inputs": )"
      R"({"target_tokens": {"dtype": "int64", "data": [2, 3], "shape": [2]}}}]}})");
  lathe::v1::SubmitRequest op;
  ASSERT_TRUE(ForwardBackwardFromJson(body, false, &op).ok());
  EXPECT_EQ(op.forward_backward().data_size(), 1);
}

TEST(TinkerConvert, SampleRequestBecomesSampleOp) {
  auto body = nlohmann::json::parse(R"({"num_samples": 3, "seq_id": 0, "sampling_session_id": "s",
      "prompt": {"chunks": [{"type": "encoded_text", "tokens": [5, 6]}, {"tokens": [7]}]},
      "sampling_params": {"max_tokens": 4, "seed": 11, "temperature": 0.5, "top_k": -1, "top_p": 0.9,
                          "stop": [2, 9]},
      "prompt_logprobs": true, "topk_prompt_logprobs": 0, "topk_sample_logprobs": 0, "type": "sample"})");
  lathe::v1::SampleOp op;
  ASSERT_TRUE(SampleFromJson(body, "lathe://r/sampler_weights/x", &op).ok());
  EXPECT_EQ(op.prompt().chunks(0).encoded_text().tokens(), Pack<int32_t>({5, 6, 7}));
  EXPECT_EQ(op.num_samples(), 3);
  EXPECT_TRUE(op.include_prompt_logprobs());
  EXPECT_EQ(op.model_path(), "lathe://r/sampler_weights/x");
  EXPECT_EQ(op.params().max_tokens(), 4);
  EXPECT_EQ(op.params().seed(), 11u);
  EXPECT_EQ(op.params().temperature(), 0.5f);
  EXPECT_EQ(op.params().top_p(), 0.9f);
  ASSERT_EQ(op.params().stop_tokens_size(), 2);
  EXPECT_EQ(op.params().stop_tokens(1).chunks(0).encoded_text().tokens(), Pack<int32_t>({9}));

  for (const char* refused : {R"({"sampling_params": {"stop": ["\n"]}})", R"({"topk_sample_logprobs": 2})",
                              R"({"record_stability_info": true})",
                              R"({"prompt": {"chunks": [{"type": "image", "data": "", "format": "png"}]}})"}) {
    auto bad = nlohmann::json::parse(R"({"prompt": {"chunks": [{"tokens": [1]}]}})");
    bad.merge_patch(nlohmann::json::parse(refused));
    lathe::v1::SampleOp ignored;
    EXPECT_EQ(SampleFromJson(bad, "p", &ignored).code(), absl::StatusCode::kInvalidArgument) << refused;
  }
}

TEST(TinkerConvert, SampleResultAsTinkerSampleResponse) {
  lathe::v1::SampleResult result;
  lathe::v1::SampledSequence* seq = result.add_sequences();
  seq->set_tokens(Pack<int32_t>({3, 4}));
  seq->set_logprobs(Pack<float>({-0.5f, -1.5f}));
  seq->set_stop_reason(lathe::v1::STOP);
  result.add_sequences()->set_stop_reason(lathe::v1::LENGTH);
  result.set_prompt_logprobs(Pack<float>({NAN, -2.0f}));
  tinker::SampleResponse out;
  ASSERT_TRUE(out.ParseFromString(SampleResponseToProto(result)));
  ASSERT_EQ(out.sequences_size(), 2);
  EXPECT_EQ(out.sequences(0).stop_reason(), tinker::STOP_REASON_STOP);
  EXPECT_EQ(out.sequences(1).stop_reason(), tinker::STOP_REASON_LENGTH);
  EXPECT_EQ(out.sequences(0).tokens(), Pack<int32_t>({3, 4}));
  EXPECT_EQ(out.sequences(0).logprobs(), Pack<float>({-0.5f, -1.5f}));
  EXPECT_EQ(out.prompt_logprobs(), result.prompt_logprobs());
  EXPECT_FALSE(out.has_topk_prompt_logprobs());
}

}  // namespace
}  // namespace lathe::http
