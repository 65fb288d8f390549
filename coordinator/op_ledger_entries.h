// The op ledger's entries (an op, a run), shared by its .cc files only.
#ifndef LATHE_COORDINATOR_OP_LEDGER_ENTRIES_H_
#define LATHE_COORDINATOR_OP_LEDGER_ENTRIES_H_

#include <cstdint>
#include <limits>
#include <map>
#include <string>

#include "coordinator/op_ledger.h"

namespace lathe::coordinator {

struct OpLedger::Op {
  enum class Phase { kBuffered, kReady, kRunning, kFinished };

  std::string run_id;
  int64_t seq_id = 0;
  // The request's deterministic serialization: the op's identity for retries
  // and what TakeReady hands out, so the request is stored once.
  std::string request_bytes;
  Phase phase = Phase::kBuffered;
  bool unordered = false;  // a sampling lane's (SubmitUnordered)
  bool recovered = false;  // restored from the journal unfinished
  int64_t journal_mark = 0;  // of its accepted record (Journal::Sync)
  absl::Time arrived;
  absl::Time finished;
  OpView view;  // state PENDING until finished
};

struct OpLedger::Run {
  // The lowest seq_id not yet released to the ready queue (or failed); every
  // op below it was released, failed or never arrived.
  int64_t next_seq = 0;
  // Ops at or above next_seq waiting for the gap before them, by seq_id.
  std::map<int64_t, Op*> buffered;
  // The seq_id of the run's delete_run once accepted: no later one is.
  int64_t deleted_at = std::numeric_limits<int64_t>::max();
  // The run's registry entry, for the journal's compaction.
  lathe::v1::JournalRun state;
};

}  // namespace lathe::coordinator

#endif  // LATHE_COORDINATOR_OP_LEDGER_ENTRIES_H_
