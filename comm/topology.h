// Where each rank runs: which node, and its place among the ranks of that node.
#pragma once

#include <string>
#include <vector>

#include "base/status.h"
#include "comm/rendezvous/rendezvous.h"

namespace strata::comm {

struct Topology {
  int rank = 0;
  int size = 1;
  int local_rank = 0;   // index among the ranks of this node
  int local_size = 1;   // ranks on this node
  int node = 0;         // node index, numbered by each node's lowest rank
  int num_nodes = 1;
  std::vector<int> node_of_rank;  // node index of every rank
  bool single_node() const { return num_nodes == 1; }
};

// Builds the topology from every rank's host name, exchanged through `rendezvous`.
StatusOr<Topology> TopologyFromHostnames(Rendezvous& rendezvous, const Deadline& deadline);

// Builds the topology from a list of host names indexed by rank.
Topology TopologyFromNames(int rank, const std::vector<std::string>& host_of_rank);

std::string LocalHostname();

}  // namespace strata::comm
