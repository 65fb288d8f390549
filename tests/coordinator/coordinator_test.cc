// Coordinator::Start refuses bad options with a Status and leaves nothing
// half built behind (no crash in the destructor of a failed start); who may
// call which service: the worker token opens ReplicaLink only, API keys open
// Lathe only.
#include "coordinator/coordinator.h"

#include <grpcpp/create_channel.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>

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

}  // namespace
}  // namespace lathe::coordinator
