// libtorch (from the wheel), Debian's gRPC / Protobuf / Abseil and Open MPI
// in one process: a tensor travels through a lathe.v1 message and back while
// a gRPC server runs on loopback. See docs/build-and-dependencies.md.
#include <ATen/ATen.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <mpi.h>

#include <chrono>

#include "absl/strings/str_cat.h"
#include "runtime/tensor_data.h"

namespace lathe::runtime {
namespace {

TEST(GrpcTorchLinkTest, TensorsProtosAndGrpcShareOneProcess) {
  int mpi_ready = 0;
  MPI_Initialized(&mpi_ready);
  if (!mpi_ready) {
    ASSERT_EQ(MPI_Init(nullptr, nullptr), MPI_SUCCESS);
  }
  int world = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  EXPECT_GE(world, 1);

  at::Tensor a = at::arange(12, at::kFloat).view({3, 4});
  at::Tensor product = at::mm(a, a.t());
  std::string bytes = TensorToWire(product).SerializeAsString();
  lathe::v1::TensorData parsed;
  ASSERT_TRUE(parsed.ParseFromString(bytes));
  EXPECT_TRUE(at::equal(TensorFromWire(parsed), product));

  grpc::AsyncGenericService service;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterAsyncGenericService(&service);
  auto cq = builder.AddCompletionQueue();
  auto server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);
  ASSERT_GT(port, 0);
  auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials());
  EXPECT_TRUE(channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(10)));
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  cq->Shutdown();
  void* tag;
  bool ok;
  while (cq->Next(&tag, &ok)) {
  }
  MPI_Finalize();
}

}  // namespace
}  // namespace lathe::runtime
