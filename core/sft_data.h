// The SFT data file (JSONL of token-id datums) and a synthetic data
// generator; torch-free, so clients read the same format the runtime does.
#ifndef LATHE_CORE_SFT_DATA_H_
#define LATHE_CORE_SFT_DATA_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "lathe/v1/types.pb.h"

namespace lathe::runtime {

// One JSON object per line, either
//   {"tokens": [t0, ..., tn]}               (+ optional "weights": n floats)
// which trains positions 0..n-1 to predict t1..tn, or the Tinker shape
//   {"model_input": [...], "loss_fn_inputs": {"target_tokens": [...], "weights": [...]}}.
// InvalidArgument naming the line for malformed input.
absl::StatusOr<std::vector<lathe::v1::Datum>> ReadSftJsonl(const std::string& path);

// Writes `count` sequences of `length` tokens that follow a learnable rule
// (start s, stride d: t[i+1] = (t[i] + d) mod vocab), deterministic in `seed`.
absl::Status WriteSyntheticSftData(const std::string& path, int64_t vocab_size, int64_t count,
                                   int64_t length, uint64_t seed);

}  // namespace lathe::runtime

#endif  // LATHE_CORE_SFT_DATA_H_
