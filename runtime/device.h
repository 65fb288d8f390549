// Where a rank's tensors live: the one place that turns a rank's device
// choice (parallel::DeviceChoice::index) into an at::Device, and the one
// helper that puts a tensor there.
#ifndef LATHE_RUNTIME_DEVICE_H_
#define LATHE_RUNTIME_DEVICE_H_

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include "absl/status/statusor.h"
#include "parallel/device.h"

namespace lathe::runtime {

// -1: the CPU. Otherwise CUDA device `cuda_index`; FailedPrecondition when
// libtorch cannot use CUDA here or sees no such device (the message says which).
absl::StatusOr<at::Device> TorchDevice(int cuda_index);

// Whether this libtorch can run on a GPU here (CUDA built in, a device visible).
bool CudaAvailable();

// GPUs on this machine for parallel::ChooseDevice's `detected`: libtorch's
// count where it can use CUDA, else the /dev/nvidia<N> nodes.
int DetectedGpus();

// The CUDA device a rank computes on, from its choice (parallel::ChooseDevice):
// choice.index, or -1 (the CPU) when libtorch cannot use CUDA here (a CPU
// build, or no usable driver), which `choice.why` then says. Every binary that places a rank calls this.
int ComputeDevice(parallel::DeviceChoice& choice);

// `t` on `device`: t itself when it is there already (or undefined), else a
// copy that keeps requires_grad (a leaf stays a leaf). Host copies wait for
// the device, so the result can be read at once.
at::Tensor OnDevice(const at::Tensor& t, at::Device device);

}  // namespace lathe::runtime

#endif  // LATHE_RUNTIME_DEVICE_H_
