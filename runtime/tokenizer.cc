#include "runtime/tokenizer.h"

#include <sentencepiece_processor.h>
#include <sys/stat.h>

#include <cerrno>

namespace strata::runtime {
namespace {

// "<0x0A>" -> 0x0A; -1 when the piece is not in that form.
int ByteFallbackValue(const std::string& piece) {
  if (piece.size() != 6 || piece.compare(0, 3, "<0x") != 0 || piece[5] != '>') return -1;
  int v = 0;
  for (int i = 3; i < 5; ++i) {
    char c = piece[i];
    int d = (c >= '0' && c <= '9')   ? c - '0'
            : (c >= 'A' && c <= 'F') ? c - 'A' + 10
            : (c >= 'a' && c <= 'f') ? c - 'a' + 10
                                     : -1;
    if (d < 0) return -1;
    v = v * 16 + d;
  }
  return v;
}

}  // namespace

Tokenizer::Tokenizer() : sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {}
Tokenizer::~Tokenizer() = default;

StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Load(const std::string& model_path) {
  // SentencePiece reports a missing file as a generic error; say NotFound ourselves.
  struct stat st;
  if (::stat(model_path.c_str(), &st) != 0) {
    return ErrnoStatus(fmt::format("tokenizer {}", model_path), errno);
  }
  std::unique_ptr<Tokenizer> tok(new Tokenizer());
  auto s = tok->sp_->Load(model_path);
  if (!s.ok()) {
    return Status::Corruption(
        fmt::format("tokenizer {}: SentencePiece cannot load it: {}", model_path, s.ToString()));
  }
  if (tok->sp_->GetPieceSize() <= 0) {
    return Status::Corruption(fmt::format("tokenizer {}: empty vocabulary", model_path));
  }
  return tok;
}

StatusOr<std::vector<int32_t>> Tokenizer::Encode(std::string_view text, bool add_bos) const {
  std::vector<int> ids;
  auto s = sp_->Encode(text, &ids);
  if (!s.ok()) {
    return Status::InvalidArgument(fmt::format("tokenizer: cannot encode: {}", s.ToString()));
  }
  std::vector<int32_t> out;
  out.reserve(ids.size() + 1);
  if (add_bos && bos_id() >= 0) out.push_back(bos_id());
  out.insert(out.end(), ids.begin(), ids.end());
  return out;
}

StatusOr<std::string> Tokenizer::Decode(const std::vector<int32_t>& ids) const {
  const int32_t n = vocab_size();
  std::vector<int> in;
  in.reserve(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= n) {
      return Status::OutOfRange(fmt::format(
          "tokenizer: id {} at position {} is outside the vocabulary [0, {})", ids[i], i, n));
    }
    in.push_back(ids[i]);
  }
  std::string text;
  auto s = sp_->Decode(in, &text);
  if (!s.ok()) {
    return Status::InvalidArgument(fmt::format("tokenizer: cannot decode: {}", s.ToString()));
  }
  return text;
}

std::string Tokenizer::DecodePiece(int32_t id) const {
  if (id < 0 || id >= vocab_size() || sp_->IsControl(id)) return "";
  const std::string& piece = sp_->IdToPiece(id);
  if (sp_->IsByte(id)) {
    int b = ByteFallbackValue(piece);
    return b >= 0 ? std::string(1, static_cast<char>(b)) : "";
  }
  if (sp_->IsUnknown(id)) return " \xE2\x81\x87 ";  // what SentencePiece's Decode prints: " ⁇ "
  std::string out;
  static constexpr std::string_view kSpace = "\xE2\x96\x81";  // U+2581 "▁"
  for (size_t i = 0; i < piece.size();) {
    if (piece.compare(i, kSpace.size(), kSpace) == 0) {
      out.push_back(' ');
      i += kSpace.size();
    } else {
      out.push_back(piece[i++]);
    }
  }
  return out;
}

int32_t Tokenizer::bos_id() const { return sp_->bos_id(); }
int32_t Tokenizer::eos_id() const { return sp_->eos_id(); }
int32_t Tokenizer::vocab_size() const { return sp_->GetPieceSize(); }

}  // namespace strata::runtime
