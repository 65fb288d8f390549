// The coordinator's executor: takes each ready operation from the ledger in
// order, fans it out to the replicas, merges their answers and records the
// outcome; keeps each run's RunInfo up to date (step, LoRA config).
//
// Thread-safe; one thread of its own dispatches, one operation at a time.
#ifndef LATHE_COORDINATOR_DISPATCHER_H_
#define LATHE_COORDINATOR_DISPATCHER_H_

#include <map>
#include <optional>
#include <string>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "coordinator/op_ledger.h"
#include "coordinator/replica_registry.h"

namespace lathe::coordinator {

class Dispatcher {
 public:
  // Neither is owned; both outlive the dispatcher. `op_timeout` bounds one
  // operation's round trip to the replicas.
  Dispatcher(OpLedger* ledger, ReplicaRegistry* registry, absl::Duration op_timeout);
  ~Dispatcher();

  void Start();
  // Finishes the operation in flight and stops.
  void Stop();

  // Registers a run created by the service (before its init op runs).
  void AddRun(const lathe::v1::RunInfo& info);
  std::optional<lathe::v1::RunInfo> Run(const std::string& run_id) const;
  int runs() const;

 private:
  void Loop();
  void Execute(const ReadyOp& op);
  void Record(const lathe::v1::SubmitRequest& op, lathe::v1::OpResult* result);

  OpLedger* ledger_;
  ReplicaRegistry* registry_;
  const absl::Duration op_timeout_;
  mutable absl::Mutex mu_;
  std::map<std::string, lathe::v1::RunInfo> runs_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace lathe::coordinator

#endif  // LATHE_COORDINATOR_DISPATCHER_H_
