// Splitting a batch over replicas and merging their answers back.
#include "coordinator/fan_out.h"

#include <gtest/gtest.h>

#include <cstring>

namespace lathe::coordinator {
namespace {

lathe::v1::Datum DatumOfLength(int n) {
  lathe::v1::Datum d;
  std::vector<int32_t> tokens(n, 1);
  d.mutable_model_input()->add_chunks()->mutable_encoded_text()->set_tokens(tokens.data(), n * sizeof(int32_t));
  return d;
}

lathe::v1::SubmitRequest Batch(const std::vector<int>& lengths) {
  lathe::v1::SubmitRequest op;
  op.set_run_id("r");
  op.set_seq_id(4);
  op.mutable_forward_backward()->set_loss_fn("cross_entropy");
  (*op.mutable_forward_backward()->mutable_loss_fn_config())["x"] = 1;
  for (int n : lengths) *op.mutable_forward_backward()->add_data() = DatumOfLength(n);
  return op;
}

// A replica's answer: one output per datum holding the datum's length.
lathe::v1::TaskResult Answer(const lathe::v1::Task& task, double loss, double frac) {
  lathe::v1::TaskResult r;
  auto* out = r.mutable_result()->mutable_forward_backward();
  out->set_loss_fn_output_type("TensorData");
  for (const auto& d : task.op().forward_backward().data()) {
    float n = static_cast<float>(d.model_input().chunks(0).encoded_text().tokens().size() / 4);
    auto& t = (*out->add_loss_fn_outputs()->mutable_tensors())["logprobs"];
    t.set_data(&n, sizeof(n));
  }
  (*out->mutable_metrics())["loss:sum"] = loss;
  (*out->mutable_metrics())["frac:mean"] = frac;
  return r;
}

TEST(FanOutTest, SplitsByTokensAndKeepsEverythingElse) {
  const FanOut f = SplitOp(Batch({100, 10, 90, 20, 5}), 2);
  ASSERT_EQ(f.tasks.size(), 2u);
  // Longest first to the lighter replica, ties to the lower one: 100 | 90,
  // 20 -> 1 (110), 10 -> 0 (110), 5 -> 0 (tie).
  EXPECT_EQ(f.datums[0], (std::vector<int>{0, 1, 4}));
  EXPECT_EQ(f.datums[1], (std::vector<int>{2, 3}));
  for (const auto& t : f.tasks) {
    EXPECT_EQ(t.op().run_id(), "r");
    EXPECT_EQ(t.op().seq_id(), 4);
    EXPECT_EQ(t.op().forward_backward().loss_fn(), "cross_entropy");
    EXPECT_EQ(t.op().forward_backward().loss_fn_config().at("x"), 1);
  }
}

TEST(FanOutTest, ReplicasWithoutDatumsGetAnEmptyPart) {
  const FanOut f = SplitOp(Batch({7}), 3);
  EXPECT_EQ(f.tasks[0].op().forward_backward().data_size(), 1);
  EXPECT_EQ(f.tasks[1].op().forward_backward().data_size(), 0);
  EXPECT_EQ(f.tasks[2].op().forward_backward().data_size(), 0);
}

TEST(FanOutTest, MergesOutputsInDatumOrderAndReducesMetrics) {
  const auto op = Batch({100, 10, 90, 20, 5});
  const FanOut f = SplitOp(op, 2);
  lathe::v1::OpError error;
  auto merged = MergeAnswers(op, f, {Answer(f.tasks[0], 1.5, 0.2), Answer(f.tasks[1], 2.5, 0.4)}, &error);
  ASSERT_TRUE(merged.ok()) << merged.status();
  EXPECT_EQ(error.code(), 0);
  const auto& out = merged->forward_backward();
  ASSERT_EQ(out.loss_fn_outputs_size(), 5);
  const std::vector<float> want = {100, 10, 90, 20, 5};
  for (int i = 0; i < 5; ++i) {
    float got = 0;
    std::memcpy(&got, out.loss_fn_outputs(i).tensors().at("logprobs").data().data(), sizeof(got));
    EXPECT_EQ(got, want[i]) << i;
  }
  EXPECT_DOUBLE_EQ(out.metrics().at("loss:sum"), 4.0);
  EXPECT_DOUBLE_EQ(out.metrics().at("frac:mean"), 0.3);
}

TEST(FanOutTest, AnEmptyReplicaDoesNotDiluteMeans) {
  const auto op = Batch({7});
  const FanOut f = SplitOp(op, 2);
  lathe::v1::OpError error;
  auto merged = MergeAnswers(op, f, {Answer(f.tasks[0], 1, 0.5), Answer(f.tasks[1], 0, 0)}, &error);
  ASSERT_TRUE(merged.ok());
  EXPECT_DOUBLE_EQ(merged->forward_backward().metrics().at("frac:mean"), 0.5);
}

TEST(FanOutTest, AUserErrorWinsOverAServerError) {
  const auto op = Batch({7, 8});
  const FanOut f = SplitOp(op, 2);
  lathe::v1::TaskResult server, user;
  server.mutable_error()->set_category(lathe::v1::OpError::SERVER);
  server.mutable_error()->set_code(13);
  user.mutable_error()->set_category(lathe::v1::OpError::USER);
  user.mutable_error()->set_code(3);
  lathe::v1::OpError error;
  ASSERT_TRUE(MergeAnswers(op, f, {server, user}, &error).ok());
  EXPECT_EQ(error.code(), 3);
}

TEST(FanOutTest, AnswersThatDoNotFitTheSplitAreInternal) {
  const auto op = Batch({7, 8});
  const FanOut f = SplitOp(op, 2);
  lathe::v1::OpError error;
  // Replica 0 received one datum but answers with two outputs.
  lathe::v1::TaskResult two = Answer(f.tasks[0], 1, 0);
  *two.mutable_result()->mutable_forward_backward()->add_loss_fn_outputs() =
      two.result().forward_backward().loss_fn_outputs(0);
  EXPECT_EQ(MergeAnswers(op, f, {two, Answer(f.tasks[1], 1, 0)}, &error).status().code(),
            absl::StatusCode::kInternal);
}

}  // namespace
}  // namespace lathe::coordinator
