// Each loss on hand-computed cases, and the logprob gather with -100.
#include "runtime/losses.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>

namespace lathe::runtime {
namespace {

at::Tensor F(std::vector<float> v) { return at::tensor(v, at::kFloat); }
at::Tensor L(std::vector<int64_t> v) { return at::tensor(v, at::kLong); }

TEST(LossesTest, TargetLogprobsGathersAndIgnores) {
  // Row 0: logits [0, ln 3] → p = [1/4, 3/4].
  at::Tensor logits = at::tensor({0.0f, std::log(3.0f), 1.0f, 1.0f}, at::kFloat).view({2, 2});
  at::Tensor lp = TargetLogprobs(logits, L({1, -100}));
  EXPECT_NEAR(lp[0].item<float>(), std::log(0.75f), 1e-6);
  EXPECT_EQ(lp[1].item<float>(), 0.0f);
  at::Tensor lp2 = TargetLogprobs(logits, L({0, 1, 1, 0}).view({2, 2}));
  EXPECT_NEAR(lp2[0][0].item<float>(), std::log(0.25f), 1e-6);
  EXPECT_NEAR(lp2[1][1].item<float>(), std::log(0.5f), 1e-6);
}

TEST(LossesTest, CrossEntropyIsMinusWeightedLogprob) {
  at::Tensor lp = F({-1.0f, -2.0f, -0.5f});
  auto loss = ElementwiseLoss("cross_entropy", lp, {{"target_tokens", L({1, -100, 2})}, {"weights", F({2.0f, 1.0f, -3.0f})}}, {});
  EXPECT_FLOAT_EQ(loss[0].item<float>(), 2.0f);
  EXPECT_FLOAT_EQ(loss[1].item<float>(), 0.0f);  // ignored target
  EXPECT_FLOAT_EQ(loss[2].item<float>(), -1.5f);  // negative weight
  auto unweighted = ElementwiseLoss("cross_entropy", lp, {{"target_tokens", L({1, 1, 1})}}, {});
  EXPECT_FLOAT_EQ(unweighted.sum().item<float>(), 3.5f);
}

TEST(LossesTest, ImportanceSampling) {
  at::Tensor lp = F({std::log(0.5f)});
  auto loss = ElementwiseLoss("importance_sampling", lp,
      {{"target_tokens", L({0})}, {"logprobs", F({std::log(0.25f)})}, {"advantages", F({3.0f})}}, {});
  EXPECT_NEAR(loss[0].item<float>(), -2.0f * 3.0f, 1e-5);  // ratio 2
}

TEST(LossesTest, PpoClipsWithConfigAndPerTokenThresholds) {
  std::map<std::string, double> cfg = {{"clip_low_threshold", 0.8}, {"clip_high_threshold", 1.2}};
  at::Tensor lp = F({std::log(2.0f), std::log(0.5f)});
  std::map<std::string, at::Tensor> in = {{"target_tokens", L({0, 0})}, {"logprobs", F({0.0f, 0.0f})},
                                          {"advantages", F({1.0f, -1.0f})}};
  auto loss = ElementwiseLoss("ppo", lp, in, cfg);
  // ratio 2, A=1: min(2, 1.2) = 1.2 → -1.2; ratio 0.5, A=-1: min(-0.5, -0.8) = -0.8 → 0.8.
  EXPECT_NEAR(loss[0].item<float>(), -1.2f, 1e-5);
  EXPECT_NEAR(loss[1].item<float>(), 0.8f, 1e-5);
  in["clip_high_threshold"] = F({1.5f, 1.5f});
  in["clip_low_threshold"] = F({0.9f, 0.9f});
  auto per_token = ElementwiseLoss("ppo", lp, in, cfg);
  EXPECT_NEAR(per_token[0].item<float>(), -1.5f, 1e-5);
  EXPECT_NEAR(per_token[1].item<float>(), 0.9f, 1e-5);
}

TEST(LossesTest, CispoStopsGradientThroughTheRatio) {
  at::Tensor lp = F({std::log(0.5f)}).requires_grad_(true);
  std::map<std::string, at::Tensor> in = {{"target_tokens", L({0})}, {"logprobs", F({std::log(0.25f)})},
                                          {"advantages", F({2.0f})}};
  auto loss = ElementwiseLoss("cispo", lp, in, {{"clip_low_threshold", 0.0}, {"clip_high_threshold", 4.0}});
  EXPECT_NEAR(loss[0].item<float>(), -2.0f * std::log(0.5f) * 2.0f, 1e-5);
  loss.sum().backward();
  EXPECT_NEAR(lp.grad()[0].item<float>(), -2.0f * 2.0f, 1e-5);  // d/dlp of -sg(r)·lp·A
}

TEST(LossesTest, DroPenalisesDrift) {
  at::Tensor lp = F({-1.0f});
  auto loss = ElementwiseLoss("dro", lp, {{"target_tokens", L({0})}, {"logprobs", F({-3.0f})}, {"advantages", F({0.5f})}},
                              {{"beta", 0.1}});
  EXPECT_NEAR(loss[0].item<float>(), -(-1.0f * 0.5f - 0.5f * 0.1f * 4.0f), 1e-6);
}

TEST(LossesTest, SpecsNameTheirInputs) {
  ASSERT_NE(FindLoss("ppo"), nullptr);
  EXPECT_EQ(FindLoss("ppo")->config_defaults.at("clip_low_threshold"), 0.8);
  EXPECT_EQ(FindLoss("cispo")->config_defaults.at("clip_high_threshold"), 4.0);
  EXPECT_EQ(FindLoss("nope"), nullptr);
  EXPECT_NE(LossNames().find("dro"), std::string::npos);
}

}  // namespace
}  // namespace lathe::runtime
