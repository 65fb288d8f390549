// The HTTP door's Tinker JSON bodies: the first byte picks the route
// (forward_backward, forward, asample, optim_step, create_model's
// lora_config), the rest is the body. Parsed and converted as the door does
// (ParseJsonBody; a json::exception is its 422), then admitted as
// FrontEnd::Admit would.
#include <cstddef>
#include <cstdint>
#include <string>

#include "fuzz/fuzz_util.h"
#include "http/tinker_convert.h"

namespace {

using nlohmann::json;

absl::Status Convert(int route, const json& body, lathe::v1::SubmitRequest* op) {
  switch (route) {
    case 0:
    case 1:
      return lathe::http::ForwardBackwardFromJson(body, route == 1, op);
    case 2:
      op->set_run_id("run-1");
      op->set_seq_id(1);
      return lathe::http::SampleFromJson(body, "lathe://run-1/sampler_weights/s1", op->mutable_sample());
    case 3:
      op->set_run_id("run-1");
      op->set_seq_id(1);
      *op->mutable_optim_step() = lathe::http::AdamFromJson(body);
      return absl::OkStatus();
    default:
      return lathe::coordinator::ValidateLora(lathe::http::LoraFromJson(body), lathe::fuzz::Model());
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const int route = data[0] % 5;
  json body;
  try {
    body = lathe::http::ParseJsonBody(std::string(reinterpret_cast<const char*>(data + 1), size - 1));
  } catch (const json::exception&) {
    return 0;
  }
  lathe::v1::SubmitRequest op;
  absl::Status s;
  try {
    s = Convert(route, body, &op);
  } catch (const json::exception&) {
    return 0;
  }
  if (s.ok() && route < 4) (void)lathe::fuzz::Admit(op);
  return 0;
}
