#include "comm/transport/transport.h"

namespace strata::comm {

Status Transport::Send(int peer, const void* buf, size_t bytes, int tag,
                       const Deadline& deadline) {
  STRATA_ASSIGN_OR_RETURN(Request req, Isend(peer, buf, bytes, tag));
  return WaitAll(std::span<Request>(&req, 1), deadline);
}

Status Transport::Recv(int peer, void* buf, size_t bytes, int tag, const Deadline& deadline) {
  STRATA_ASSIGN_OR_RETURN(Request req, Irecv(peer, buf, bytes, tag));
  return WaitAll(std::span<Request>(&req, 1), deadline);
}

}  // namespace strata::comm
