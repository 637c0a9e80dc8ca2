// SentencePiece tokenizer (Llama's tokenizer.model), wrapped so callers see Status and strata's
// types instead of the library's.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace strata::runtime {

class Tokenizer {
 public:
  // NotFound when the file is missing, Corruption when SentencePiece cannot parse it.
  static StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& model_path);
  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // add_bos prepends bos_id() (as Llama's prompts do) when the model has one.
  StatusOr<std::vector<int32_t>> Encode(std::string_view text, bool add_bos) const;
  // OutOfRange for an id outside [0, vocab_size()). Control tokens (BOS, EOS) decode to nothing.
  StatusOr<std::string> Decode(const std::vector<int32_t>& ids) const;
  // One token's text for streaming output: "▁" becomes a space, a byte-fallback piece "<0x0A>"
  // becomes that raw byte (callers concatenate, so multi-byte UTF-8 reassembles), control tokens
  // and out-of-range ids give "". Unlike Decode, a leading space is kept, because mid-stream it
  // separates words.
  std::string DecodePiece(int32_t id) const;

  int32_t bos_id() const;  // -1 when the model has none
  int32_t eos_id() const;
  int32_t vocab_size() const;

 private:
  Tokenizer();
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
};

}  // namespace strata::runtime
