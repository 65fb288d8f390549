// The HTTP door's protobuf forward / forward_backward body (Tinker's
// ForwardBackwardRequest), converted and admitted as the door does.
#include <cstddef>
#include <cstdint>

#include "fuzz/fuzz_util.h"
#include "http/tinker_convert.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  lathe::http::tinker::ForwardBackwardRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  lathe::v1::SubmitRequest op;
  if (!lathe::http::ForwardBackwardFromProto(request, &op).ok()) return 0;
  LATHE_FUZZ_CHECK(op.has_forward() || op.has_forward_backward());
  (void)lathe::fuzz::Admit(op);
  return 0;
}
