#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "base/logging.h"
#include "comm/rendezvous/rendezvous.h"

namespace strata::comm {
namespace {

class FileRendezvous final : public Rendezvous {
 public:
  FileRendezvous(std::string dir, int rank, int size)
      : dir_(std::move(dir)), rank_(rank), size_(size) {}

  int rank() const override { return rank_; }
  int size() const override { return size_; }

  StatusOr<std::vector<std::string>> AllGather(const std::string& mine,
                                               const Deadline& deadline) override {
    const int round = round_++;
    STRATA_RETURN_IF_ERROR(WriteAtomically(PathFor(round, rank_), mine));
    std::vector<std::string> out(size_);
    for (int r = 0; r < size_; ++r) {
      const std::string path = PathFor(round, r);
      while (true) {
        std::ifstream in(path, std::ios::binary);
        if (in) {
          std::ostringstream ss;
          ss << in.rdbuf();
          out[r] = ss.str();
          break;
        }
        if (deadline.expired()) {
          return Status::DeadlineExceeded("rendezvous in " + dir_ + ": rank " +
                                          std::to_string(r) + " did not publish round " +
                                          std::to_string(round));
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
      }
    }
    return out;
  }

 private:
  std::string PathFor(int round, int rank) const {
    return dir_ + "/round" + std::to_string(round) + ".rank" + std::to_string(rank);
  }

  static Status WriteAtomically(const std::string& path, const std::string& data) {
    const std::string tmp = path + ".tmp";
    const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return ErrnoStatus("rendezvous: open " + tmp, errno);
    size_t done = 0;
    while (done < data.size()) {
      const ssize_t n = ::write(fd, data.data() + done, data.size() - done);
      if (n < 0) {
        if (errno == EINTR) continue;
        const int err = errno;
        ::close(fd);
        return ErrnoStatus("rendezvous: write " + tmp, err);
      }
      done += static_cast<size_t>(n);
    }
    if (::close(fd) != 0) return ErrnoStatus("rendezvous: close " + tmp, errno);
    if (::rename(tmp.c_str(), path.c_str()) != 0) {
      return ErrnoStatus("rendezvous: rename " + tmp, errno);
    }
    return Status::OK();
  }

  std::string dir_;
  int rank_;
  int size_;
  int round_ = 0;
};

}  // namespace

std::unique_ptr<Rendezvous> MakeFileRendezvous(std::string dir, int rank, int size) {
  return std::make_unique<FileRendezvous>(std::move(dir), rank, size);
}

}  // namespace strata::comm
