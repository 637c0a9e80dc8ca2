// MPI backend: point-to-point over MPI_Isend/MPI_Irecv on a private duplicate of the caller's
// communicator, the library's own collectives for Algorithm::kNative, a rendezvous for other
// transports, and node-local topology from MPI_Comm_split_type.
#pragma once

#include <mpi.h>

#include <memory>

#include "base/status.h"
#include "comm/native.h"
#include "comm/rendezvous/rendezvous.h"
#include "comm/topology.h"
#include "comm/transport/transport.h"

namespace strata::comm::mpi {

// Turns an MPI return code into a Status naming the call and the place it was made.
Status MpiStatus(int rc, const char* call, const char* file, int line);
#define STRATA_MPI(call) ::strata::comm::mpi::MpiStatus((call), #call, __FILE__, __LINE__)

// Initializes MPI if nobody has (thread level FUNNELED: only the calling thread talks to MPI).
// With Open MPI it first raises the shared-memory eager limit to kSharedMemoryEagerLimit unless
// SharedMemoryEagerLimitVariable() is already set (see the .cc for why).
Status EnsureInitialized(int* argc, char*** argv);
inline constexpr int kSharedMemoryEagerLimit = 32768;
// The environment variable (an Open MPI MCA parameter) that EnsureInitialized sets; nullptr
// with another MPI library.
const char* SharedMemoryEagerLimitVariable();
bool IsInitialized();

StatusOr<std::unique_ptr<Transport>> CreateTransport(MPI_Comm comm);
std::unique_ptr<NativeCollectives> CreateNative(MPI_Comm comm);
std::unique_ptr<Rendezvous> CreateRendezvous(MPI_Comm comm);

// Node-local ranks from MPI_Comm_split_type(MPI_COMM_TYPE_SHARED), the source of truth when MPI
// is running; node ids are numbered in order of each node's lowest rank.
StatusOr<Topology> DiscoverTopology(MPI_Comm comm);

}  // namespace strata::comm::mpi
