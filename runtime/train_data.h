// Training data: a token stream and the batches cut from it.
//
// A corpus is either text, tokenized with the model's SentencePiece tokenizer, or a pre-tokenized
// binary (raw little-endian int32 ids, extension .tok or .i32). Text is cut into documents at
// blank lines and at lines holding only "%" (the fortune-file separator); each document is encoded
// with its line breaks and preceded by BOS, so the model learns where documents start.
//
// Batches are a pure function of (seed, step, sequence index): the window of sequence j of step
// s starts at a position drawn by a counter-based hash, never by a stateful generator. Any rank
// can produce its part of the global batch without the others, the same global batch comes out
// for any rank count, and a resumed run needs only the step number as its data cursor.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "base/status.h"

namespace strata::runtime {

class Tokenizer;

class TokenCorpus {
 public:
  // Tokenizes a text file. InvalidArgument when it holds no text.
  static StatusOr<TokenCorpus> FromText(const std::string& path, const Tokenizer& tokenizer);
  // Reads raw int32 ids; InvalidArgument on a size that is not a multiple of 4, an empty file, or
  // an id outside [0, vocab_size).
  static StatusOr<TokenCorpus> FromTokenFile(const std::string& path, int64_t vocab_size);
  // FromTokenFile for .tok/.i32 paths, else FromText (tokenizer required then).
  static StatusOr<TokenCorpus> Load(const std::string& path, const Tokenizer* tokenizer,
                                    int64_t vocab_size);
  explicit TokenCorpus(std::vector<int32_t> tokens) : tokens_(std::move(tokens)) {}

  const std::vector<int32_t>& tokens() const { return tokens_; }
  size_t size() const { return tokens_.size(); }
  int64_t documents() const { return documents_; }

  // Writes sequences [first, first + count) of step `step`'s global batch, each seq + 1 tokens
  // (inputs and shifted targets), to out[count][seq + 1]. InvalidArgument when the corpus is
  // shorter than seq + 1 tokens.
  Status Batch(uint64_t seed, int64_t step, int64_t first, int64_t count, int64_t seq,
               int32_t* out) const;

 private:
  std::vector<int32_t> tokens_;
  int64_t documents_ = 0;
};

// Entropy in nats of the corpus's unigram token distribution: the loss a model that ignores
// context could reach. Training must go well below it.
double UnigramEntropy(const std::vector<int32_t>& tokens);

}  // namespace strata::runtime
