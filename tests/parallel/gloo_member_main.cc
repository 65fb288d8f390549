// One member of a cross-replica Gloo group, as its own process (no MPI): the
// test driver (gloo_communicator_test.cc) starts several against one
// coordinator's rendezvous store. Usage:
//   gloo_member COORDINATOR STATUS_DIR NAME SEED PLAN...
// Each PLAN step is GENERATION:RANK:SIZE:END. The member forms that
// generation's group through the store and checks every collective on
// (seed, rank) inputs; END "next" then goes on to the next step, END "fail"
// all-reduces round after round until a collective fails (a peer was
// killed) and writes STATUS_DIR/NAME.gGENERATION.failed with the error.
// STATUS_DIR/NAME.gGENERATION.running appears after the first rounds,
// NAME.gGENERATION.done after the checks. Exit 0 when every check passed.
// The worker token comes from $LATHE_WORKER_TOKEN.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "dp_worker/link_store.h"
#include "parallel/gloo_communicator.h"

namespace lathe::parallel {
namespace {

const absl::Duration kTimeout = absl::Seconds(5);
int failures = 0;
std::string name;

void Expect(bool ok, const std::string& what) {
  if (!ok) {
    std::fprintf(stderr, "%s: FAILED %s\n", name.c_str(), what.c_str());
    ++failures;
  }
}
void ExpectOk(const absl::Status& s, const std::string& what) {
  Expect(s.ok(), absl::StrCat(what, ": ", s.ToString()));
}

// The (seed, rank, i) input every check derives its answer from: small
// integers, exact in every element type.
int64_t Value(int seed, int rank, int64_t i) { return (seed * 31 + rank * 7 + i * 3) % 97 - 48; }

template <typename T>
void CheckAllReduceSum(Communicator& c, int seed, ElemType type, int64_t count) {
  std::vector<T> x(count);
  for (int64_t i = 0; i < count; ++i) x[i] = static_cast<T>(Value(seed, c.rank(), i));
  ExpectOk(c.AllReduceSum({x.data(), count, type}, kTimeout), "all_reduce");
  bool ok = true;
  for (int64_t i = 0; i < count; ++i) {
    int64_t want = 0;
    for (int r = 0; r < c.size(); ++r) want += Value(seed, r, i);
    ok &= x[i] == static_cast<T>(want);
  }
  Expect(ok, absl::StrCat("all_reduce sum of ", count, " elements of type ", static_cast<int>(type)));
}

void CheckOthers(Communicator& c, int seed) {
  const int n = c.size(), me = c.rank();
  std::vector<int64_t> m(7);
  for (int i = 0; i < 7; ++i) m[i] = Value(seed, me, i);
  ExpectOk(c.AllReduceMax({m.data(), 7, ElemType::kInt64}, kTimeout), "all_reduce_max");
  for (int i = 0; i < 7; ++i) {
    int64_t want = Value(seed, 0, i);
    for (int r = 1; r < n; ++r) want = std::max(want, Value(seed, r, i));
    Expect(m[i] == want, absl::StrCat("all_reduce_max element ", i));
  }

  std::vector<float> mine(5), all(5 * n);
  for (int i = 0; i < 5; ++i) mine[i] = Value(seed, me, i);
  ExpectOk(c.AllGather({mine.data(), 5}, {all.data(), 5 * n}, kTimeout), "all_gather");
  for (int r = 0; r < n; ++r)
    for (int i = 0; i < 5; ++i) Expect(all[r * 5 + i] == Value(seed, r, i), "all_gather block");
  Expect(absl::IsInvalidArgument(c.AllGather({mine.data(), 5}, {all.data(), 5 * n - 1}, kTimeout)),
         "a short all_gather buffer is refused");
  // Empty collectives (an all-gather of nothing divides by zero inside Gloo).
  ExpectOk(c.AllGather({mine.data(), 0}, {all.data(), 0}, kTimeout), "empty all_gather");
  ExpectOk(c.AllReduceSum({mine.data(), 0}, kTimeout), "empty all_reduce");
  ExpectOk(c.Broadcast({mine.data(), 0}, 0, kTimeout), "empty broadcast");

  std::vector<double> send(4 * n), recv(4);
  for (int64_t i = 0; i < 4 * n; ++i) send[i] = Value(seed, me, i);
  ExpectOk(c.ReduceScatterSum({send.data(), 4 * n, ElemType::kFloat64}, {recv.data(), 4, ElemType::kFloat64},
                              kTimeout),
           "reduce_scatter");
  for (int k = 0; k < 4; ++k) {
    int64_t want = 0;
    for (int r = 0; r < n; ++r) want += Value(seed, r, me * 4 + k);
    Expect(recv[k] == want, "reduce_scatter block");
  }

  // Uneven: member r sends (r + j) % 3 + 1 elements to member j.
  std::vector<int64_t> sc(n), rc(n);
  for (int j = 0; j < n; ++j) sc[j] = (me + j) % 3 + 1, rc[j] = (j + me) % 3 + 1;
  std::vector<int32_t> out, in(3 * n, -1);
  for (int j = 0; j < n; ++j)
    for (int k = 0; k < sc[j]; ++k) out.push_back(Value(seed, me, j * 100 + k));
  ExpectOk(c.AllToAll({out.data(), static_cast<int64_t>(out.size()), ElemType::kInt32}, sc,
                      {in.data(), 3 * n, ElemType::kInt32}, rc, kTimeout),
           "all_to_all");
  size_t at = 0;
  for (int j = 0; j < n; ++j)
    for (int k = 0; k < rc[j]; ++k) Expect(in[at++] == Value(seed, j, me * 100 + k), "all_to_all block");

  const int root = n - 1;
  std::vector<int64_t> b(9, -1);
  if (me == root)
    for (int i = 0; i < 9; ++i) b[i] = Value(seed, root, i);
  ExpectOk(c.Broadcast({b.data(), 9, ElemType::kInt64}, root, kTimeout), "broadcast");
  for (int i = 0; i < 9; ++i) Expect(b[i] == Value(seed, root, i), "broadcast element");
  Expect(absl::IsInvalidArgument(c.Broadcast({b.data(), 9, ElemType::kInt64}, n, kTimeout)),
         "a broadcast root outside the group is refused");
  ExpectOk(c.Barrier(kTimeout), "barrier");
}

void CheckCollectives(Communicator& c, int seed) {
  CheckAllReduceSum<float>(c, seed, ElemType::kFloat32, 1007);
  // Past Gloo's 1 MiB segment: the ring runs in several pieces.
  CheckAllReduceSum<float>(c, seed + 1, ElemType::kFloat32, 700000);
  CheckAllReduceSum<double>(c, seed, ElemType::kFloat64, 33);
  CheckAllReduceSum<int32_t>(c, seed, ElemType::kInt32, 1);
  CheckAllReduceSum<int64_t>(c, seed, ElemType::kInt64, 65);
  CheckOthers(c, seed);
  // Every member agrees on the verdict.
  int64_t total = failures;
  ExpectOk(c.AllReduceSum({&total, 1, ElemType::kInt64}, kTimeout), "verdict");
  Expect(total == failures, "another member failed a check");
}

void Touch(const std::string& path, const std::string& text) { std::ofstream(path) << text << "\n"; }

// All-reduces until a collective fails; the failure must say so (no hang).
void RunUntilFailure(Communicator& c, int seed, const std::string& prefix) {
  for (int round = 0;; ++round) {
    std::vector<float> x(4096, static_cast<float>(c.rank() + 1));
    const absl::Time start = absl::Now();
    absl::Status s = c.AllReduceSum({x.data(), 4096}, kTimeout);
    if (!s.ok()) {
      Expect(absl::IsUnavailable(s) || absl::IsDeadlineExceeded(s), absl::StrCat("a lost peer: ", s.ToString()));
      Expect(absl::Now() - start < kTimeout + absl::Seconds(2), "the failure came within the timeout");
      Expect(absl::IsFailedPrecondition(c.Barrier(kTimeout)), "a broken communicator refuses later calls");
      Touch(prefix + ".failed", s.ToString());
      return;
    }
    Expect(x[0] == c.size() * (c.size() + 1) / 2.0f, "a round's sum");
    if (round == 5) Touch(prefix + ".running", "");
    if (round > 20000) {
      Expect(false, "no member was killed");
      return;
    }
  }
  (void)seed;
}

int Main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: gloo_member COORDINATOR STATUS_DIR NAME SEED PLAN...\n");
    return 2;
  }
  const char* token = std::getenv("LATHE_WORKER_TOKEN");
  dp_worker::LinkOptions link;
  link.coordinator = argv[1];
  link.worker_token = token ? token : "";
  link.connect_timeout = absl::Seconds(20);
  const std::string dir = argv[2];
  name = argv[3];
  int seed = 0;
  if (!absl::SimpleAtoi(argv[4], &seed)) return 2;
  dp_worker::LinkStore store(link);
  for (int a = 5; a < argc; ++a) {
    std::vector<std::string> step = absl::StrSplit(argv[a], ':');
    StoreGroupOptions o;
    if (step.size() != 4 || !absl::SimpleAtoi(step[0], &o.generation) || !absl::SimpleAtoi(step[1], &o.rank) ||
        !absl::SimpleAtoi(step[2], &o.size)) {
      std::fprintf(stderr, "bad plan step %s\n", argv[a]);
      return 2;
    }
    o.hostname = "127.0.0.1";
    o.connect_timeout = absl::Seconds(30);
    const std::string prefix = absl::StrCat(dir, "/", name, ".g", o.generation);
    auto c = MakeGlooCommunicator(o, &store);
    if (!c.ok()) {
      Expect(false, absl::StrCat("forming generation ", o.generation, ": ", c.status().ToString()));
      return 1;
    }
    Expect((*c)->rank() == o.rank && (*c)->size() == o.size, "rank and size");
    CheckCollectives(**c, seed + static_cast<int>(o.generation));
    if (failures) return 1;
    Touch(prefix + ".done", "");
    if (step[3] == "fail") RunUntilFailure(**c, seed, prefix);
    if (failures) return 1;
    std::printf("%s: generation %lld (rank %d of %d) passed\n", name.c_str(),
                static_cast<long long>(o.generation), o.rank, o.size);
    std::fflush(stdout);
  }
  return failures == 0 ? 0 : 1;
}

}  // namespace
}  // namespace lathe::parallel

int main(int argc, char** argv) { return lathe::parallel::Main(argc, argv); }
