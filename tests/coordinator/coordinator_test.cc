// Coordinator::Start refuses bad options with a Status and leaves nothing
// half built behind (no crash in the destructor of a failed start); a served
// coordinator answers oversized identifiers and unparseable requests with
// INVALID_ARGUMENT and a short message.
#include "coordinator/coordinator.h"

#include <grpcpp/create_channel.h>
#include <grpcpp/generic/generic_stub.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>
#include <vector>

#include "absl/synchronization/notification.h"
#include "coordinator/request_limits.h"
#include "lathe/v1/service.grpc.pb.h"

namespace lathe::coordinator {
namespace {

CoordinatorOptions Options(const std::string& listen, AuthMode auth) {
  CoordinatorOptions o;
  o.listen = listen;
  o.auth = auth;
  return o;
}

TEST(CoordinatorTest, RequiredKeysMissingIsAnErrorNotACrash) {
  unsetenv("LATHE_API_KEYS");
  auto open = Coordinator::Start(Options("0.0.0.0:0", AuthMode::kAuto));
  EXPECT_EQ(open.status().code(), absl::StatusCode::kFailedPrecondition) << open.status();
  auto on = Coordinator::Start(Options("127.0.0.1:0", AuthMode::kOn));
  EXPECT_EQ(on.status().code(), absl::StatusCode::kFailedPrecondition) << on.status();
}

TEST(CoordinatorTest, RefusesDurationsAndBoundsThatAreNotPositive) {
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

TEST(CoordinatorTest, AnAddressThatCannotBeBoundIsUnavailable) {
  // 192.0.2.1 (TEST-NET-1) is no address of this machine.
  auto c = Coordinator::Start(Options("192.0.2.1:0", AuthMode::kOff));
  EXPECT_EQ(c.status().code(), absl::StatusCode::kUnavailable) << c.status();
}

TEST(CoordinatorTest, StartsWithKeysOnAnOpenAddress) {
  setenv("LATHE_API_KEYS", "k1", 1);
  auto c = Coordinator::Start(Options("0.0.0.0:0", AuthMode::kAuto));
  unsetenv("LATHE_API_KEYS");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_GT((*c)->port(), 0);
}

// A replica that registers and never answers: enough for the deployment to serve.
class SilentReplica : public ReplicaSink {
 public:
  bool Send(const lathe::v1::CoordinatorMessage&) override { return true; }
  void Cancel() override {}
};

class ServedCoordinatorTest : public ::testing::Test {
 protected:
  void SetUp() override {
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
