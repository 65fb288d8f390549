// Which GPU a rank uses: by its local rank among the devices it can see,
// or device 0 when the launcher shows each task only its own device
// (slurm --gpus-per-task, one GPU per Kubernetes container, ...).
#ifndef LATHE_PARALLEL_DEVICE_H_
#define LATHE_PARALLEL_DEVICE_H_

#include <string>

#include "absl/status/statusor.h"
#include "parallel/rank_info.h"

namespace lathe::parallel {

struct DeviceChoice {
  int index = -1;    // CUDA device ordinal among the visible ones; -1: no GPU, the rank runs on CPU
  int visible = 0;   // devices this process can see
  std::string why;   // one line for the log
};

// Pure: `env` supplies CUDA_VISIBLE_DEVICES; `detected` is the number of
// devices on the machine, used when CUDA_VISIBLE_DEVICES is unset.
// - CUDA_VISIBLE_DEVICES empty, "-1" or "NoDevFiles", or no device: CPU;
// - one visible device: device 0 (the launcher bound one device to this task);
// - at least local_size visible: device local_rank;
// - more ranks on the node than visible devices (but more than one device):
//   FailedPrecondition naming both counts.
absl::StatusOr<DeviceChoice> ChooseDevice(const RankInfo& rank, const EnvLookup& env, int detected);

// NVIDIA devices on this machine (/dev/nvidia<N> nodes), without CUDA.
int CountNvidiaDevices();

}  // namespace lathe::parallel

#endif  // LATHE_PARALLEL_DEVICE_H_
