// What the Loops route files (loops_trainer.cc, loops_sampler.cc,
// loops_control.cc, loops_checkpoints.cc) share: the door's memory of the Loops URLs it serves and
// the calls into the FrontEnd they all make. Not for use outside http/.
#ifndef LATHE_HTTP_LOOPS_DOOR_H_
#define LATHE_HTTP_LOOPS_DOOR_H_

#include <httplib.h>

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "coordinator/front_end.h"

namespace lathe::http {

// A trainer base URL: /loops/local or /loops/runs/<run> (matches[1] is
// "local" or "runs/<run>"); its sampler is <trainer>/sampler.
inline constexpr char kLoopsTrainer[] = R"(/loops/(local|runs/[A-Za-z0-9._-]{1,128}))";
inline constexpr char kLoopsLocal[] = "local";

// What the door remembers of the Loops URLs it serves. Thread-safe through mu.
struct LoopsState {
  // A trainer URL: the lathe run it drives now and the seq_id mapping.
  struct Trainer {
    std::string run;         // "" before the first init (local mode)
    int64_t offset = 0;      // ledger seq_id = offset + Loops seq_id
    int64_t last = 0;        // the highest ledger seq_id given to the run
    bool fresh = false;      // made by the control plane: its creation is the first init's
    int32_t lora_rank = 0;   // as created
    std::string created_op;  // the creation's init op
    std::string session_id;  // control-plane runs
    absl::Time created_at;
  };
  // A run's publications.
  struct Book {
    std::vector<std::string> published;  // bump_version saves since the last init, oldest first
  };
  struct Version {
    int64_t step = 0;
    std::string path;  // lathe://<run>/sampler_weights/<name>
  };
  absl::Mutex mu;
  // One init_trainer_server at seq_id 1 at a time per trainer URL (a slot:
  // "local" or a run the control plane made); never removed, like `trainers`.
  std::map<std::string, std::unique_ptr<absl::Mutex>> init_mus ABSL_GUARDED_BY(mu);
  std::map<std::string, Trainer> trainers ABSL_GUARDED_BY(mu);  // "local" or a run id
  std::map<std::string, Book> books ABSL_GUARDED_BY(mu);        // by run id
  std::map<std::string, Version> versions ABSL_GUARDED_BY(mu);  // a finished save's op id -> its version
  std::map<std::string, std::string> inits ABSL_GUARDED_BY(mu);  // "<slot> <Idempotency-Key>" -> op id
  std::deque<std::string> inits_order ABSL_GUARDED_BY(mu);       // oldest first
};

using JsonRoute = std::function<void(const httplib::Request&, const nlohmann::json&, httplib::Response&)>;

// The door as the Loops routes use it; none owned.
struct LoopsDoor {
  httplib::Server* server;
  coordinator::FrontEnd* front_end;
  absl::Duration poll_hold;  // how long a GET /operations/{id} holds
  const int* port;           // the door's port (set once it listens)
  LoopsState* st;
  // HttpDoor::Impl::PostJson: the body parsed, 422 for one of the wrong shape.
  std::function<void(const std::string& path, JsonRoute route)> post_json;
};

void AddLoopsTrainerRoutes(const LoopsDoor& door);  // loops_trainer.cc
void AddLoopsSamplerRoutes(const LoopsDoor& door);  // loops_sampler.cc
void AddLoopsControlRoutes(const LoopsDoor& door);     // loops_control.cc
void AddLoopsCheckpointRoutes(const LoopsDoor& door);  // loops_checkpoints.cc

// "local", or the run id of a trainer or sampler URL.
std::string LoopsSlot(const httplib::Request& req);
// The lathe run a trainer or sampler URL drives now ("" none yet).
std::string LoopsRun(const LoopsDoor& door, const httplib::Request& req);
// An error a Loops client acts on correctly: never 400/404 for a permanent
// one at submit (the SDK retries those for an hour), 503 only while the
// deployment shuts down, 502 (retried) while it starts or lost a replica.
void LoopsFail(const LoopsDoor& door, httplib::Response& res, const absl::Status& s);
// Waits up to `limit` for op_id to finish: its view (still PENDING after
// `limit`), or the Retrieve error.
absl::StatusOr<lathe::v1::RetrieveResponse> AwaitOp(const LoopsDoor& door, const std::string& auth,
                                                    const std::string& op_id, absl::Duration limit);
// The run's live version: its newest finished bump_version save, if any.
std::optional<LoopsState::Version> LiveVersion(const LoopsDoor& door, const std::string& auth,
                                               const std::string& run);
// The deployment's base model ("" if the key is refused).
std::string LoopsBaseModel(const LoopsDoor& door, const httplib::Request& req);

}  // namespace lathe::http

#endif  // LATHE_HTTP_LOOPS_DOOR_H_
