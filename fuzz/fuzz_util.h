// Shared pieces of the fuzz targets: the model a deployment would serve, an
// invariant check that aborts (so libFuzzer records the input), and the
// checks FrontEnd::Admit applies to a submitted operation.
#ifndef LATHE_FUZZ_FUZZ_UTIL_H_
#define LATHE_FUZZ_FUZZ_UTIL_H_

#include <cstdio>
#include <cstdlib>

#include "absl/status/status.h"
#include "google/protobuf/stubs/logging.h"
#include "coordinator/op_validation.h"
#include "coordinator/request_limits.h"
#include "lathe/v1/replica.pb.h"
#include "lathe/v1/service.pb.h"

// A broken invariant of the code under test: print it and abort.
#define LATHE_FUZZ_CHECK(cond)                                                          \
  do {                                                                                  \
    if (!(cond)) {                                                                      \
      std::fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                     \
    }                                                                                   \
  } while (0)

namespace lathe::fuzz {

// Protobuf logs every string field that is not UTF-8; quiet, so the fuzz
// log shows findings.
inline const bool kQuietProtobuf = (google::protobuf::SetLogHandler(nullptr), true);

// A small deployment's model summary (a tiny Qwen3 as the tests serve).
inline const lathe::v1::ModelSummary& Model() {
  static const lathe::v1::ModelSummary* model = [] {
    auto* m = new lathe::v1::ModelSummary;
    m->set_base_model("tiny-qwen3");
    m->set_architecture("Qwen3ForCausalLM");
    m->set_vocab_size(1000);
    m->set_max_seq_len(256);
    m->set_max_lora_rank(64);
    return m;
  }();
  return *model;
}

// What FrontEnd::Admit checks of a submitted operation before the ledger
// sees it (authorization, serving state and weight resolution aside).
inline absl::Status Admit(const lathe::v1::SubmitRequest& op) {
  if (absl::Status s = coordinator::ValidateRunId(op.run_id()); !s.ok()) return s;
  return coordinator::ValidateOp(op, Model());
}

}  // namespace lathe::fuzz

#endif  // LATHE_FUZZ_FUZZ_UTIL_H_
