// The `lathe` commands: info, train, checkpoints. Each prints its answer to
// stdout and returns the process exit code (0 ok, 1 failure), naming the
// failure on stderr.
#ifndef LATHE_CLIENT_COMMANDS_H_
#define LATHE_CLIENT_COMMANDS_H_

#include <string>

#include "client/train.h"

namespace lathe::client {

// Health, capabilities and, with a run_id, the run's RunInfo.
int InfoCommand(Client& client, const std::string& run_id);
// Trains (see client/train.h); exits 1 unless the loss fell by min_loss_drop.
int TrainCommand(Client& client, const TrainOptions& options, double min_loss_drop);
// The checkpoints of a run (or of the base model without run_id).
int CheckpointsCommand(Client& client, const std::string& run_id);
// Prints "lathe: <status>" and returns 1.
int Fail(const absl::Status& status);

}  // namespace lathe::client

#endif  // LATHE_CLIENT_COMMANDS_H_
