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

TEST(LossesTest, GspoClipsTheSequenceRatioWithPerTokenGradients) {
  // Marked log-ratios ln 2 and 0: the sequence ratio is sqrt(2) for every
  // token, the unmarked third one included.
  at::Tensor lp = F({std::log(0.5f), std::log(0.25f), std::log(0.5f)}).requires_grad_(true);
  std::map<std::string, at::Tensor> in = {{"target_tokens", L({0, 0, 0})},
                                          {"logprobs", F({std::log(0.25f), std::log(0.25f), 0.0f})},
                                          {"advantages", F({1.0f, -1.0f, 2.0f})},
                                          {"sequence_ratio_mask", F({1.0f, 1.0f, 0.0f})}};
  auto loss = ElementwiseLoss("gspo", lp, in, {{"clip_low_threshold", 0.8}, {"clip_high_threshold", 1.2}});
  const float s = std::sqrt(2.0f);
  EXPECT_NEAR(loss[0].item<float>(), -1.2f, 1e-5);       // min(s, 1.2)
  EXPECT_NEAR(loss[1].item<float>(), s, 1e-5);           // min(-s, -1.2) = -s
  EXPECT_NEAR(loss[2].item<float>(), -2.0f * 1.2f, 1e-5);
  loss.sum().backward();
  // Clipped tokens get no gradient; the unclipped one gets -s·A through its own
  // logprob only (the sequence mean is a stop-gradient factor).
  EXPECT_FLOAT_EQ(lp.grad()[0].item<float>(), 0.0f);
  EXPECT_NEAR(lp.grad()[1].item<float>(), s, 1e-5);
  EXPECT_FLOAT_EQ(lp.grad()[2].item<float>(), 0.0f);
}

TEST(LossesTest, GspoOfOneTokenIsPpo) {
  std::map<std::string, double> cfg = {{"clip_low_threshold", 0.9}, {"clip_high_threshold", 1.1}};
  for (float q : {-3.0f, -1.0f, -0.2f}) {
    std::map<std::string, at::Tensor> in = {{"target_tokens", L({0})}, {"logprobs", F({q})},
                                            {"advantages", F({-1.5f})}, {"sequence_ratio_mask", F({1.0f})}};
    at::Tensor lp = F({-1.0f});
    EXPECT_NEAR(ElementwiseLoss("gspo", lp, in, cfg)[0].item<float>(), ElementwiseLoss("ppo", lp, in, cfg)[0].item<float>(),
                1e-6);
  }
}

TEST(LossesTest, GspoSkipsIgnoredTargetsAndSurvivesAnEmptyMask) {
  std::map<std::string, double> cfg = {{"clip_low_threshold", 0.5}, {"clip_high_threshold", 3.0}};
  // The ignored position is marked but has no logprob: it is not in the mean.
  std::map<std::string, at::Tensor> in = {{"target_tokens", L({0, -100})},
                                          {"logprobs", F({std::log(0.25f), -3.0f})},
                                          {"advantages", F({1.0f, 1.0f})},
                                          {"sequence_ratio_mask", F({1.0f, 1.0f})}};
  auto loss = ElementwiseLoss("gspo", F({std::log(0.5f), 0.0f}), in, cfg);
  EXPECT_NEAR(loss[0].item<float>(), -2.0f, 1e-5);
  EXPECT_EQ(loss[1].item<float>(), 0.0f);
  // No marked token: ratio 1, a finite loss of -A per loss token.
  in["sequence_ratio_mask"] = F({0.0f, 0.0f});
  loss = ElementwiseLoss("gspo", F({std::log(0.5f), 0.0f}), in, cfg);
  EXPECT_NEAR(loss[0].item<float>(), -1.0f, 1e-6);
  EXPECT_EQ(loss[1].item<float>(), 0.0f);
  // Every target ignored: all zeros.
  in["target_tokens"] = L({-100, -100});
  in["sequence_ratio_mask"] = F({1.0f, 1.0f});
  loss = ElementwiseLoss("gspo", F({0.0f, 0.0f}), in, cfg);
  EXPECT_EQ(loss.abs().sum().item<float>(), 0.0f);
}

TEST(LossesTest, SpecsNameTheirInputs) {
  ASSERT_NE(FindLoss("ppo"), nullptr);
  EXPECT_EQ(FindLoss("ppo")->config_defaults.at("clip_low_threshold"), 0.8);
  EXPECT_EQ(FindLoss("cispo")->config_defaults.at("clip_high_threshold"), 4.0);
  EXPECT_EQ(FindLoss("nope"), nullptr);
  EXPECT_NE(LossNames().find("dro"), std::string::npos);
  const LossSpec* gspo = FindLoss("gspo");
  ASSERT_NE(gspo, nullptr);
  EXPECT_EQ(gspo->required_inputs.back(), "sequence_ratio_mask");
  EXPECT_EQ(gspo->config_defaults.at("clip_low_threshold"), 0.8);
  EXPECT_EQ(gspo->config_defaults.at("clip_high_threshold"), 1.2);
}

}  // namespace
}  // namespace lathe::runtime
