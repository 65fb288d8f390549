// The table of supported losses with their inputs and config defaults.
#include "core/loss_spec.h"

#include "absl/strings/str_join.h"

namespace lathe::runtime {
namespace {

const std::vector<LossSpec>& Specs() {
  static const std::vector<LossSpec> specs = {
      {"cross_entropy", {"target_tokens"}, {"weights"}, {}},
      {"importance_sampling", {"target_tokens", "logprobs", "advantages"}, {}, {}},
      {"ppo",
       {"target_tokens", "logprobs", "advantages"},
       {"clip_low_threshold", "clip_high_threshold"},
       {{"clip_low_threshold", 0.8}, {"clip_high_threshold", 1.2}}},
      {"cispo",
       {"target_tokens", "logprobs", "advantages"},
       {"clip_low_threshold", "clip_high_threshold"},
       {{"clip_low_threshold", 0.0}, {"clip_high_threshold", 4.0}}},
      {"dro", {"target_tokens", "logprobs", "advantages"}, {}, {{"beta", 0.05}}},
      // GSPO-token: the ratio of PPO replaced by the sequence's geometric-mean
      // ratio over the tokens sequence_ratio_mask marks (nonzero).
      {"gspo",
       {"target_tokens", "logprobs", "advantages", "sequence_ratio_mask"},
       {"clip_low_threshold", "clip_high_threshold"},
       {{"clip_low_threshold", 0.8}, {"clip_high_threshold", 1.2}}},
  };
  return specs;
}

}  // namespace

const LossSpec* FindLoss(const std::string& name) {
  for (const LossSpec& s : Specs()) {
    if (s.name == name) return &s;
  }
  return nullptr;
}

std::string LossNames() {
  std::vector<std::string> names;
  for (const LossSpec& s : Specs()) names.push_back(s.name);
  return absl::StrJoin(names, ", ");
}

}  // namespace lathe::runtime
