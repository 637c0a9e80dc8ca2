// Rendezvous: how ranks find each other before any transport exists. Only used during setup to
// exchange small blobs (listen addresses, host names); byte movement lives in comm/transport/.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "base/clock.h"
#include "base/status.h"

namespace strata::comm {

class Rendezvous {
 public:
  virtual ~Rendezvous() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Every rank contributes one blob; every rank gets all blobs indexed by rank. Collective: all
  // ranks call it the same number of times.
  virtual StatusOr<std::vector<std::string>> AllGather(const std::string& mine,
                                                       const Deadline& deadline) = 0;
};

// Exchanges blobs through files in a folder every rank can see (one machine, several network
// namespaces on one machine, or a shared file system). Files are written temp + rename so no rank
// ever reads half a blob. The folder must be empty or fresh for each group.
std::unique_ptr<Rendezvous> MakeFileRendezvous(std::string dir, int rank, int size);

}  // namespace strata::comm
