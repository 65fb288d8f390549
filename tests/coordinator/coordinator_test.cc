// Coordinator::Start refuses bad options with a Status and leaves nothing
// half built behind (no crash in the destructor of a failed start); who may
// call which service: the worker token opens ReplicaLink only, API keys open
// Lathe only; a served coordinator answers oversized identifiers and
// unparseable requests with INVALID_ARGUMENT and a short message.
#include "coordinator/coordinator.h"

#include <grpcpp/create_channel.h>
#include <grpcpp/generic/generic_stub.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <vector>

#include "absl/synchronization/notification.h"
#include "coordinator/request_limits.h"
#include "lathe/v1/replica.grpc.pb.h"
#include "lathe/v1/service.grpc.pb.h"

namespace lathe::coordinator {
namespace {

constexpr char kToken[] = "worker-token-0123456789abcdef";

class CoordinatorTest : public testing::Test {
 protected:
  void SetUp() override {
    setenv("LATHE_WORKER_TOKEN", kToken, 1);
    unsetenv("LATHE_API_KEYS");
  }
  void TearDown() override {
    unsetenv("LATHE_WORKER_TOKEN");
    unsetenv("LATHE_API_KEYS");
  }
};

CoordinatorOptions Options(const std::string& listen, AuthMode auth) {
  CoordinatorOptions o;
  o.listen = listen;
  o.auth = auth;
  return o;
}

TEST_F(CoordinatorTest, RequiredKeysMissingIsAnErrorNotACrash) {
  CoordinatorOptions open = Options("0.0.0.0:0", AuthMode::kAuto);
  open.insecure_listen = true;
  EXPECT_EQ(Coordinator::Start(open).status().code(), absl::StatusCode::kFailedPrecondition);
  auto on = Coordinator::Start(Options("127.0.0.1:0", AuthMode::kOn));
  EXPECT_EQ(on.status().code(), absl::StatusCode::kFailedPrecondition) << on.status();
}

TEST_F(CoordinatorTest, RefusesDurationsAndBoundsThatAreNotPositive) {
  std::vector<std::function<void(CoordinatorOptions&)>> bad = {
      [](CoordinatorOptions& o) { o.ledger.gap_timeout = absl::ZeroDuration(); },
      [](CoordinatorOptions& o) { o.ledger.result_ttl = -absl::Seconds(1); },
      [](CoordinatorOptions& o) { o.op_timeout = -absl::InfiniteDuration(); },
      [](CoordinatorOptions& o) { o.heartbeat_interval = absl::ZeroDuration(); },
      [](CoordinatorOptions& o) { o.ledger.max_unfinished = 0; },
  };
  for (size_t i = 0; i < bad.size(); ++i) {
    CoordinatorOptions o = Options("127.0.0.1:0", AuthMode::kOff);
    bad[i](o);
    EXPECT_EQ(Coordinator::Start(o).status().code(), absl::StatusCode::kInvalidArgument) << i;
  }
  CoordinatorOptions o = Options("127.0.0.1:0", AuthMode::kOff);
  o.ledger.gap_timeout = absl::Seconds(1e300);  // saturates to "never"
  EXPECT_TRUE(Coordinator::Start(o).ok());
}

TEST_F(CoordinatorTest, AnAddressThatCannotBeBoundIsUnavailable) {
  // 192.0.2.1 (TEST-NET-1) is no address of this machine.
  CoordinatorOptions o = Options("192.0.2.1:0", AuthMode::kOff);
  o.insecure_listen = true;
  auto c = Coordinator::Start(o);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kUnavailable) << c.status();
}

TEST_F(CoordinatorTest, StartsWithKeysOnAnOpenAddressWhenPlaintextIsAllowed) {
  setenv("LATHE_API_KEYS", "k1", 1);
  CoordinatorOptions o = Options("0.0.0.0:0", AuthMode::kAuto);
  o.insecure_listen = true;
  auto c = Coordinator::Start(o);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_GT((*c)->port(), 0);
}

TEST_F(CoordinatorTest, PlaintextOffLoopbackNeedsTheExplicitFlag) {
  setenv("LATHE_API_KEYS", "k1", 1);
  auto c = Coordinator::Start(Options("0.0.0.0:0", AuthMode::kAuto));
  EXPECT_EQ(c.status().code(), absl::StatusCode::kFailedPrecondition) << c.status();
  EXPECT_NE(c.status().message().find("--insecure_listen"), absl::string_view::npos) << c.status();
}

TEST_F(CoordinatorTest, TlsFilesMustComeInPairsAndBeReadable) {
  CoordinatorOptions half = Options("127.0.0.1:0", AuthMode::kOff);
  half.tls_cert_file = "/nonexistent/cert.pem";
  EXPECT_EQ(Coordinator::Start(half).status().code(), absl::StatusCode::kInvalidArgument);
  half.tls_key_file = "/nonexistent/key.pem";
  EXPECT_EQ(Coordinator::Start(half).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(CoordinatorTest, NoWorkerTokenRefusesToStart) {
  unsetenv("LATHE_WORKER_TOKEN");
  auto c = Coordinator::Start(Options("127.0.0.1:0", AuthMode::kOff));
  EXPECT_EQ(c.status().code(), absl::StatusCode::kFailedPrecondition) << c.status();
  EXPECT_NE(c.status().message().find("--worker_token_file"), absl::string_view::npos) << c.status();
  setenv("LATHE_WORKER_TOKEN", "short", 1);
  EXPECT_EQ(Coordinator::Start(Options("127.0.0.1:0", AuthMode::kOff)).status().code(),
            absl::StatusCode::kInvalidArgument);
  const std::string path = testing::TempDir() + "/worker_token";
  std::ofstream(path) << kToken << "\n";
  CoordinatorOptions from_file = Options("127.0.0.1:0", AuthMode::kOff);
  from_file.worker_token_file = path;
  EXPECT_TRUE(Coordinator::Start(from_file).ok());
}

TEST_F(CoordinatorTest, WorkerTokenMustNotBeAnApiKey) {
  setenv("LATHE_API_KEYS", std::string("k1,").append(kToken).c_str(), 1);
  auto c = Coordinator::Start(Options("127.0.0.1:0", AuthMode::kOn));
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << c.status();
}

// The code a ReplicaLink stream ends with when it presents `metadata` and
// sends a heartbeat first (a registered replica never does): UNAUTHENTICATED
// when refused before anything is read, INVALID_ARGUMENT once admitted.
grpc::StatusCode LinkCode(int port, const std::string& key, const std::string& value) {
  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials());
  auto stub = lathe::v1::ReplicaLink::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  if (!key.empty()) context.AddMetadata(key, value);
  auto stream = stub->Connect(&context);
  lathe::v1::WorkerMessage beat;
  beat.mutable_heartbeat();
  stream->Write(beat);
  stream->WritesDone();
  return stream->Finish().error_code();
}

grpc::StatusCode LatheCode(int port, const std::string& key, const std::string& value) {
  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials());
  auto stub = lathe::v1::Lathe::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  if (!key.empty()) context.AddMetadata(key, value);
  lathe::v1::Capabilities caps;
  return stub->GetCapabilities(&context, lathe::v1::GetCapabilitiesRequest(), &caps).error_code();
}

TEST_F(CoordinatorTest, OnlyTheWorkerTokenOpensReplicaLink) {
  setenv("LATHE_API_KEYS", "client-key", 1);
  // Loopback without keys (auth auto) still requires the worker token.
  for (AuthMode mode : {AuthMode::kOn, AuthMode::kAuto}) {
    auto c = Coordinator::Start(Options("127.0.0.1:0", mode));
    ASSERT_TRUE(c.ok()) << c.status();
    const int port = (*c)->port();
    EXPECT_EQ(LinkCode(port, "", ""), grpc::StatusCode::UNAUTHENTICATED);
    EXPECT_EQ(LinkCode(port, "authorization", "Bearer client-key"), grpc::StatusCode::UNAUTHENTICATED);
    EXPECT_EQ(LinkCode(port, "lathe-worker-token", "client-key"), grpc::StatusCode::UNAUTHENTICATED);
    EXPECT_EQ(LinkCode(port, "lathe-worker-token", std::string(kToken) + "x"), grpc::StatusCode::UNAUTHENTICATED);
    EXPECT_EQ(LinkCode(port, "lathe-worker-token", kToken), grpc::StatusCode::INVALID_ARGUMENT);
  }
}

TEST_F(CoordinatorTest, TheWorkerTokenOpensNothingOnLathe) {
  setenv("LATHE_API_KEYS", "client-key", 1);
  auto c = Coordinator::Start(Options("127.0.0.1:0", AuthMode::kOn));
  ASSERT_TRUE(c.ok()) << c.status();
  const int port = (*c)->port();
  EXPECT_EQ(LatheCode(port, "lathe-worker-token", kToken), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(LatheCode(port, "authorization", std::string("Bearer ") + kToken), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(LatheCode(port, "authorization", "Bearer client-key"), grpc::StatusCode::OK);
}

// A replica that registers and never answers: enough for the deployment to serve.
class SilentReplica : public ReplicaSink {
 public:
  bool Send(const lathe::v1::CoordinatorMessage&) override { return true; }
  void Cancel() override {}
};

class ServedCoordinatorTest : public CoordinatorTest {
 protected:
  void SetUp() override {
    CoordinatorTest::SetUp();
    CoordinatorOptions o = Options("127.0.0.1:0", AuthMode::kOff);
    o.service.checkpoint_root = std::filesystem::temp_directory_path().string();
    auto c = Coordinator::Start(o);
    ASSERT_TRUE(c.ok()) << c.status();
    coordinator_ = *std::move(c);
    lathe::v1::RegisterReplica r;
    r.mutable_layout()->set_replicas(1);
    r.mutable_model()->set_base_model("m");
    r.mutable_model()->set_vocab_size(16);
    r.mutable_model()->set_max_seq_len(8);
    ASSERT_TRUE(coordinator_->registry().Register(r, &replica_).ok());
    channel_ = grpc::CreateChannel(absl::StrCat("127.0.0.1:", coordinator_->port()),
                                   grpc::InsecureChannelCredentials());
    stub_ = lathe::v1::Lathe::NewStub(channel_);
  }

  SilentReplica replica_;  // outlives the coordinator, which writes to it at shutdown
  std::unique_ptr<Coordinator> coordinator_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<lathe::v1::Lathe::Stub> stub_;
};

TEST_F(ServedCoordinatorTest, AMegabyteIdentifierIsInvalidArgumentWithAShortMessage) {
  const std::string huge(1 << 20, 'r');
  using Call = std::function<grpc::Status(grpc::ClientContext*)>;
  std::map<std::string, Call> calls;
  calls["Submit"] = [&](grpc::ClientContext* ctx) {
    lathe::v1::SubmitRequest request;
    request.set_run_id(huge);
    request.set_seq_id(1);
    request.mutable_noop();
    lathe::v1::SubmitResponse response;
    return stub_->Submit(ctx, request, &response);
  };
  calls["GetInfo"] = [&](grpc::ClientContext* ctx) {
    lathe::v1::GetInfoRequest request;
    request.set_run_id(huge);
    lathe::v1::RunInfo response;
    return stub_->GetInfo(ctx, request, &response);
  };
  calls["CreateRun"] = [&](grpc::ClientContext* ctx) {
    lathe::v1::CreateRunRequest request;
    request.set_base_model(huge);
    lathe::v1::CreateRunResponse response;
    return stub_->CreateRun(ctx, request, &response);
  };
  calls["Retrieve"] = [&](grpc::ClientContext* ctx) {
    lathe::v1::RetrieveRequest request;
    request.set_op_id(huge);
    lathe::v1::RetrieveResponse response;
    return stub_->Retrieve(ctx, request, &response);
  };
  calls["ListCheckpoints"] = [&](grpc::ClientContext* ctx) {
    lathe::v1::ListCheckpointsRequest request;
    request.set_run_id(huge);
    lathe::v1::ListCheckpointsResponse response;
    return stub_->ListCheckpoints(ctx, request, &response);
  };
  calls["GetCheckpointFiles"] = [&](grpc::ClientContext* ctx) {
    lathe::v1::GetCheckpointFilesRequest request;
    request.set_checkpoint_id(huge);
    lathe::v1::GetCheckpointFilesResponse response;
    return stub_->GetCheckpointFiles(ctx, request, &response);
  };
  calls["DeleteCheckpoint"] = [&](grpc::ClientContext* ctx) {
    lathe::v1::DeleteCheckpointRequest request;
    request.set_checkpoint_id("lathe://" + huge + "/weights/c");
    lathe::v1::DeleteCheckpointResponse response;
    return stub_->DeleteCheckpoint(ctx, request, &response);
  };
  calls["DownloadCheckpointFile"] = [&](grpc::ClientContext* ctx) {
    lathe::v1::DownloadCheckpointFileRequest request;
    request.set_checkpoint_id("lathe://run-a/weights/c");
    request.set_relative_file_name(huge);
    auto reader = stub_->DownloadCheckpointFile(ctx, request);
    lathe::v1::FileChunk chunk;
    while (reader->Read(&chunk)) {
    }
    return reader->Finish();
  };
  for (const auto& [name, call] : calls) {
    grpc::ClientContext ctx;
    const grpc::Status s = call(&ctx);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << name << ": " << s.error_message().substr(0, 200);
    EXPECT_LE(s.error_message().size(), kMaxStatusMessageBytes) << name;
  }
}

TEST_F(ServedCoordinatorTest, AnUnparseableRequestIsInvalidArgumentNamingTheMethod) {
  grpc::GenericStub generic(channel_);
  const char garbage[] = "\xff\xff\xff\xff";  // a field tag whose varint never ends
  grpc::Slice slice(garbage, sizeof(garbage) - 1);
  grpc::ByteBuffer request(&slice, 1);
  for (const std::string method : {"/lathe.v1.Lathe/Submit", "/lathe.v1.Lathe/GetInfo"}) {
    grpc::ClientContext ctx;
    grpc::ByteBuffer response;
    grpc::Status status;
    absl::Notification done;
    generic.UnaryCall(&ctx, method, grpc::StubOptions(), &request, &response, [&](grpc::Status s) {
      status = std::move(s);
      done.Notify();
    });
    ASSERT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(30)));
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << method << ": " << status.error_message();
    EXPECT_NE(status.error_message().find(method), std::string::npos) << status.error_message();
  }
}

}  // namespace
}  // namespace lathe::coordinator
