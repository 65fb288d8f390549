// The loss functions lathe knows, what inputs and config keys each accepts.
// Torch-free so validation can use it.
#ifndef LATHE_CORE_LOSS_SPEC_H_
#define LATHE_CORE_LOSS_SPEC_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace lathe::runtime {

// What a loss accepts. Every input tensor has leading dimension N (tokens).
struct LossSpec {
  std::string name;
  std::vector<std::string> required_inputs;
  std::vector<std::string> optional_inputs;
  std::map<std::string, double> config_defaults;  // the accepted loss_fn_config keys
};

// nullptr for an unknown loss name.
const LossSpec* FindLoss(const std::string& name);
// "cross_entropy, importance_sampling, ..." for error messages.
std::string LossNames();

// Target token id that marks a position with no loss (and logprob 0).
inline constexpr int64_t kIgnoreTarget = -100;

}  // namespace lathe::runtime

#endif  // LATHE_CORE_LOSS_SPEC_H_
