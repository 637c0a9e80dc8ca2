// TCP transport: one persistent, TCP_NODELAY connection per pair of ranks, raw contiguous
// payloads behind a 16-byte header, and a progress engine that polls every connection at once
// so a hub receives from all workers concurrently and sends back without serializing them.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "base/clock.h"
#include "base/status.h"
#include "comm/rendezvous/rendezvous.h"
#include "comm/transport/transport.h"

namespace strata::comm::tcp {

struct TcpOptions {
  // Interface whose IPv4 address this rank listens on and advertises. "auto": 127.0.0.1 when all
  // ranks share one node (single_node), else the first non-loopback interface that is up.
  std::string ifname = "auto";
  // Set by the caller when every rank runs on this host; lets "auto" pick loopback.
  bool single_node = false;
  // EMULATED one-way delay added to every received message, in microseconds. The kernels we run
  // on have no netem; the delay is applied by the receiver, so it needs no clock sync.
  int64_t link_delay_us = 0;
  // Busy-poll (yielding the core) this long before blocking in ppoll: a blocked rank pays a
  // scheduler wake-up per hop, which on edge-sized messages is a large share of the latency.
  int64_t spin_us = 50;
  // How long to wait for all connections to be established.
  std::chrono::milliseconds connect_timeout{60000};
};

// Creates the transport: listens, exchanges "ip:port" through `rendezvous`, connects the full mesh.
StatusOr<std::unique_ptr<Transport>> CreateTransport(Rendezvous& rendezvous,
                                                     const TcpOptions& options);

// The IPv4 address of `ifname` ("lo", "veth0", ...), or of the first non-loopback interface that
// is up when ifname is "auto" (loopback if single_node).
StatusOr<std::string> ResolveInterfaceAddress(const std::string& ifname, bool single_node);

}  // namespace strata::comm::tcp
