#include "comm/topology.h"

#include <unistd.h>

#include <map>

namespace strata::comm {

std::string LocalHostname() {
  char buf[256] = {};
  if (::gethostname(buf, sizeof(buf) - 1) != 0) return "localhost";
  return buf;
}

Topology TopologyFromNames(int rank, const std::vector<std::string>& host_of_rank) {
  Topology t;
  t.rank = rank;
  t.size = static_cast<int>(host_of_rank.size());
  std::map<std::string, int> node_index;
  t.node_of_rank.resize(t.size);
  for (int r = 0; r < t.size; ++r) {
    auto [it, inserted] = node_index.emplace(host_of_rank[r], static_cast<int>(node_index.size()));
    t.node_of_rank[r] = it->second;
  }
  t.num_nodes = static_cast<int>(node_index.size());
  t.node = t.node_of_rank[rank];
  t.local_rank = 0;
  t.local_size = 0;
  for (int r = 0; r < t.size; ++r) {
    if (t.node_of_rank[r] != t.node) continue;
    if (r < rank) ++t.local_rank;
    ++t.local_size;
  }
  return t;
}

StatusOr<Topology> TopologyFromHostnames(Rendezvous& rendezvous, const Deadline& deadline) {
  STRATA_ASSIGN_OR_RETURN(std::vector<std::string> names,
                          rendezvous.AllGather(LocalHostname(), deadline));
  return TopologyFromNames(rendezvous.rank(), names);
}

}  // namespace strata::comm
