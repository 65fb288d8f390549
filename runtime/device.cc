// Device mapping for the runtime's tensors.
#include "runtime/device.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>

#include "absl/strings/str_cat.h"

namespace lathe::runtime {

bool CudaAvailable() { return at::hasCUDA() && at::getNumGPUs() > 0; }

int DetectedGpus() { return CudaAvailable() ? static_cast<int>(at::getNumGPUs()) : parallel::CountNvidiaDevices(); }

int ComputeDevice(parallel::DeviceChoice& choice) {
  if (choice.index >= 0 && !at::hasCUDA()) {
    choice.why += "; libtorch cannot use CUDA here (a CPU build of libtorch, or no usable driver): CPU";
    choice.index = -1;
  }
  return choice.index;
}

absl::StatusOr<at::Device> TorchDevice(int cuda_index) {
  if (cuda_index < 0) return at::Device(at::kCPU);
  if (!at::hasCUDA()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "this rank was given CUDA device ", cuda_index,
        " but libtorch cannot use CUDA here (a CPU build of libtorch: build with LATHE_CUDA=1, "
        "docs/build-and-dependencies.md; or no usable driver)"));
  }
  const int count = static_cast<int>(at::getNumGPUs());
  if (cuda_index >= count) {
    return absl::FailedPreconditionError(
        absl::StrCat("this rank was given CUDA device ", cuda_index, " but libtorch sees ", count));
  }
  return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(cuda_index));
}

at::Tensor OnDevice(const at::Tensor& t, at::Device device) {
  if (!t.defined() || t.device() == device) return t;
  at::Tensor moved = t.detach().to(device, /*non_blocking=*/false, /*copy=*/true);
  if (t.requires_grad()) moved.requires_grad_(true);
  return moved;
}

}  // namespace lathe::runtime
