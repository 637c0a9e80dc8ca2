#include "runtime/train_data.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <string_view>

#include <fmt/format.h>

#include "runtime/file_util.h"
#include "runtime/tokenizer.h"

namespace strata::runtime {
namespace {

uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

bool EndsWith(const std::string& s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Entropy in nats of a distribution given as counts of each id (zeros allowed) over n ids.
double EntropyOfCounts(const std::vector<int64_t>& counts, double n) {
  double h = 0;
  for (const int64_t c : counts) {
    if (c == 0) continue;
    const double p = static_cast<double>(c) / n;
    h -= p * std::log(p);
  }
  return h;
}

}  // namespace

struct TokenCorpus::File {
  int fd = -1;
  std::string path;
  ~File() {
    if (fd >= 0) ::close(fd);
  }
};

TokenCorpus::TokenCorpus(std::vector<int32_t> tokens) : owned_(std::move(tokens)) {
  size_ = owned_.size();
  unigram_entropy_ = UnigramEntropy(owned_);
}

Status TokenCorpus::Read(size_t first, size_t n, int32_t* out) const {
  if (first > size_ || n > size_ - first) {
    return Status::InvalidArgument(
        fmt::format("tokens [{}, +{}) outside the corpus of {}", first, n, size_));
  }
  if (!file_) {
    std::memcpy(out, owned_.data() + first, n * sizeof(int32_t));
    return Status::OK();
  }
  auto* dst = reinterpret_cast<char*>(out);
  size_t done = 0;
  const size_t bytes = n * sizeof(int32_t);
  while (done < bytes) {
    const ssize_t r = ::pread(file_->fd, dst + done, bytes - done,
                              static_cast<off_t>(first * sizeof(int32_t) + done));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return ErrnoStatus(fmt::format("read {}", file_->path), errno);
    if (r == 0) {
      return Status::IOError(fmt::format("{}: the token file shrank while training read it",
                                         file_->path));
    }
    done += static_cast<size_t>(r);
  }
  return Status::OK();
}

StatusOr<TokenCorpus> TokenCorpus::FromText(const std::string& path, const Tokenizer& tokenizer) {
  STRATA_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  std::vector<int32_t> tokens;
  int64_t docs = 0;
  std::string doc;
  auto flush = [&]() -> Status {
    while (!doc.empty() && doc.back() == '\n') doc.pop_back();
    if (doc.empty()) return Status::OK();
    STRATA_ASSIGN_OR_RETURN(std::vector<int32_t> ids, tokenizer.Encode(doc, /*add_bos=*/true));
    tokens.insert(tokens.end(), ids.begin(), ids.end());
    ++docs;
    doc.clear();
    return Status::OK();
  };
  size_t pos = 0;
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) nl = text.size();
    std::string_view line(text.data() + pos, nl - pos);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty() || line == "%") {
      STRATA_RETURN_IF_ERROR(flush());
    } else {
      doc.append(line);
      doc.push_back('\n');
    }
    pos = nl + 1;
  }
  STRATA_RETURN_IF_ERROR(flush());
  if (tokens.empty()) return Status::InvalidArgument(path + ": the corpus holds no text");
  TokenCorpus c(std::move(tokens));  // computes the entropy
  c.documents_ = docs;
  return c;
}

StatusOr<TokenCorpus> TokenCorpus::FromTokenFile(const std::string& path, int64_t vocab_size) {
  auto file = std::make_shared<File>();
  file->path = path;
  file->fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (file->fd < 0) return ErrnoStatus(fmt::format("open {}", path), errno);
  const int fd = file->fd;
  struct stat sb {};
  if (::fstat(fd, &sb) != 0) return ErrnoStatus(fmt::format("fstat {}", path), errno);
  const size_t bytes = static_cast<size_t>(sb.st_size);
  if (bytes == 0) return Status::InvalidArgument(path + ": the token file is empty");
  if (bytes % 4 != 0) {
    return Status::InvalidArgument(fmt::format(
        "{}: {} bytes is not a whole number of int32 token ids", path, bytes));
  }
  // Checked (and counted for the entropy) through a small buffer: the pages go to the page
  // cache only, never into this process's RSS.
  std::vector<int32_t> buf(1 << 18);
  std::vector<int64_t> counts(static_cast<size_t>(vocab_size));  // ids are checked to fit
  size_t done = 0;
  while (done < bytes) {
    const size_t want = std::min(bytes - done, buf.size() * sizeof(int32_t));
    const ssize_t r = ::pread(fd, buf.data(), want, static_cast<off_t>(done));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return ErrnoStatus(fmt::format("read {}", path), errno);
    if (r == 0 || r % 4 != 0) {
      return Status::IOError(fmt::format("{}: short read at byte {} of {}", path, done, bytes));
    }
    const size_t n = static_cast<size_t>(r) / 4;
    for (size_t i = 0; i < n; ++i) {
      if (buf[i] < 0 || buf[i] >= vocab_size) {
        return Status::InvalidArgument(fmt::format("{}: token {} at index {} is outside [0, {})",
                                                   path, buf[i], done / 4 + i, vocab_size));
      }
      ++counts[buf[i]];
    }
    done += static_cast<size_t>(r);
  }
  (void)::posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM);  // batches read scattered windows
  TokenCorpus c;
  c.file_ = std::move(file);
  c.size_ = bytes / 4;
  c.documents_ = 1;
  c.unigram_entropy_ = EntropyOfCounts(counts, static_cast<double>(bytes / 4));
  return c;
}

StatusOr<TokenCorpus> TokenCorpus::Load(const std::string& path, const Tokenizer* tokenizer,
                                        int64_t vocab_size) {
  if (EndsWith(path, ".tok") || EndsWith(path, ".i32")) return FromTokenFile(path, vocab_size);
  if (tokenizer == nullptr) {
    return Status::InvalidArgument(path + " is text, and there is no tokenizer to encode it "
                                          "(give --tokenizer, or a model folder that has one)");
  }
  STRATA_ASSIGN_OR_RETURN(TokenCorpus c, FromText(path, *tokenizer));
  for (int32_t id : c.owned_) {
    if (id >= vocab_size) {
      return Status::InvalidArgument(fmt::format(
          "the tokenizer produces id {} but the model's vocabulary has {} entries", id,
          vocab_size));
    }
  }
  return c;
}

Status TokenCorpus::Batch(uint64_t seed, int64_t step, int64_t first, int64_t count, int64_t seq,
                          int32_t* out) const {
  const int64_t n = static_cast<int64_t>(size_);
  if (n < seq + 1) {
    return Status::InvalidArgument(fmt::format(
        "the corpus has {} tokens, fewer than one sequence of {} + 1", n, seq));
  }
  const uint64_t starts = static_cast<uint64_t>(n - seq);  // windows [start, start + seq]
  for (int64_t j = 0; j < count; ++j) {
    const uint64_t key = SplitMix64(seed ^ SplitMix64(static_cast<uint64_t>(step) * 0x100000001b3ULL +
                                                       static_cast<uint64_t>(first + j)));
    const uint64_t start = key % starts;
    STRATA_RETURN_IF_ERROR(Read(start, static_cast<size_t>(seq + 1), out + j * (seq + 1)));
  }
  return Status::OK();
}

double UnigramEntropy(std::span<const int32_t> tokens) {
  if (tokens.empty()) return 0;
  std::vector<int64_t> counts(static_cast<size_t>(*std::max_element(tokens.begin(), tokens.end())) + 1);
  for (const int32_t t : tokens) ++counts[static_cast<size_t>(t)];
  return EntropyOfCounts(counts, static_cast<double>(tokens.size()));
}

}  // namespace strata::runtime
