#include "runtime/train_data.h"

#include <cmath>
#include <cstring>
#include <string_view>
#include <unordered_map>

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

}  // namespace

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
  TokenCorpus c(std::move(tokens));
  c.documents_ = docs;
  return c;
}

StatusOr<TokenCorpus> TokenCorpus::FromTokenFile(const std::string& path, int64_t vocab_size) {
  STRATA_ASSIGN_OR_RETURN(std::string bytes, ReadFileToString(path));
  if (bytes.empty()) return Status::InvalidArgument(path + ": the token file is empty");
  if (bytes.size() % 4 != 0) {
    return Status::InvalidArgument(fmt::format(
        "{}: {} bytes is not a whole number of int32 token ids", path, bytes.size()));
  }
  std::vector<int32_t> tokens(bytes.size() / 4);
  std::memcpy(tokens.data(), bytes.data(), bytes.size());
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= vocab_size) {
      return Status::InvalidArgument(fmt::format("{}: token {} at index {} is outside [0, {})",
                                                 path, tokens[i], i, vocab_size));
    }
  }
  TokenCorpus c(std::move(tokens));
  c.documents_ = 1;
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
  for (int32_t id : c.tokens()) {
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
  const int64_t n = static_cast<int64_t>(tokens_.size());
  if (n < seq + 1) {
    return Status::InvalidArgument(fmt::format(
        "the corpus has {} tokens, fewer than one sequence of {} + 1", n, seq));
  }
  const uint64_t starts = static_cast<uint64_t>(n - seq);  // windows [start, start + seq]
  for (int64_t j = 0; j < count; ++j) {
    const uint64_t key = SplitMix64(seed ^ SplitMix64(static_cast<uint64_t>(step) * 0x100000001b3ULL +
                                                       static_cast<uint64_t>(first + j)));
    const uint64_t start = key % starts;
    std::memcpy(out + j * (seq + 1), tokens_.data() + start, (seq + 1) * sizeof(int32_t));
  }
  return Status::OK();
}

double UnigramEntropy(const std::vector<int32_t>& tokens) {
  std::unordered_map<int32_t, int64_t> counts;
  for (int32_t t : tokens) ++counts[t];
  double h = 0;
  const double n = static_cast<double>(tokens.size());
  for (const auto& [id, c] : counts) {
    const double p = static_cast<double>(c) / n;
    h -= p * std::log(p);
  }
  return h;
}

}  // namespace strata::runtime
