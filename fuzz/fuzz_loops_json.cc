// The HTTP door's Loops JSON bodies: the first byte picks the route
// (forward_backward, forward, sample, or a bt://loops: path), the rest is
// the body, converted as the Loops routes do and admitted as
// FrontEnd::Admit would.
#include <cstddef>
#include <cstdint>
#include <string>

#include "fuzz/fuzz_util.h"
#include "http/loops_convert.h"
#include "http/tinker_convert.h"

namespace {

using nlohmann::json;

void Paths(const std::string& text) {
  const std::string lathe = lathe::http::LatheFromBt(text);
  if (!lathe.empty()) LATHE_FUZZ_CHECK(lathe::http::BtPath(lathe) == text);
  const std::string bt = lathe::http::BtPath(text);
  if (bt != text) LATHE_FUZZ_CHECK(lathe::http::LatheFromBt(bt) == text);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const int route = data[0] % 4;
  if (route == 3) {
    Paths(std::string(reinterpret_cast<const char*>(data + 1), size - 1));
    return 0;
  }
  json body;
  try {
    body = lathe::http::ParseJsonBody(std::string(reinterpret_cast<const char*>(data + 1), size - 1));
  } catch (const json::exception&) {
    return 0;
  }
  lathe::v1::SubmitRequest op;
  absl::Status s;
  try {
    if (route == 2) {
      op.set_run_id("run-1");
      op.set_seq_id(2);
      s = lathe::http::LoopsSampleFromJson(body, op.mutable_sample());
      op.mutable_sample()->set_current_weights(true);
    } else {
      s = lathe::http::LoopsForwardBackwardFromJson(body, route == 1, "run-1", 2, &op);
    }
  } catch (const json::exception&) {
    return 0;
  }
  if (s.ok()) (void)lathe::fuzz::Admit(op);
  return 0;
}
