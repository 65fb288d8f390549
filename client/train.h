// `lathe train`: supervised fine-tuning through a deployment, from a JSONL
// file of token-id datums (core/sft_data.h), one progress line per step.
#ifndef LATHE_CLIENT_TRAIN_H_
#define LATHE_CLIENT_TRAIN_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "client/lathe_client.h"

namespace lathe::client {

struct TrainOptions {
  std::string data_path;
  lathe::v1::LoraConfig lora;
  int64_t steps = 20;
  int64_t batch_size = 8;
  double learning_rate = 1e-3;
  double grad_clip_norm = 0.0;
  absl::Duration op_timeout = absl::Hours(1);  // per operation
  bool print = true;
  std::string save_name;  // non-empty: save_state under this name after the last step
};

struct TrainSummary {
  std::string run_id;
  double first_loss = 0;  // mean per-token loss of the first step
  double last_loss = 0;
  double tokens_per_second = 0;  // over every step after the first
  std::string checkpoint;        // lathe://… when saved
};

// Creates a run and trains it. Submits step k+1 before waiting for step k, so
// the deployment never idles between steps. Errors: the data file's, the
// deployment's (with the failing step named).
absl::StatusOr<TrainSummary> Train(Client& client, const TrainOptions& options);

}  // namespace lathe::client

#endif  // LATHE_CLIENT_TRAIN_H_
