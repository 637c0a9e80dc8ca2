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
//
// A pre-tokenized file is not read into the process: it is checked once with small reads, and
// each batch then reads its windows with pread, so a corpus of many GiB costs page cache, not
// RSS, as a training run's memory should grow with the model only. (Mapping it instead left
// megabytes of it in RSS: a fault maps a whole large folio of the page cache.)
#pragma once

#include <cstdint>
#include <memory>
#include <span>
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
  // Checks raw int32 ids and keeps the file open for Batch; InvalidArgument on a size that is
  // not a multiple of 4, an empty file, or an id outside [0, vocab_size).
  static StatusOr<TokenCorpus> FromTokenFile(const std::string& path, int64_t vocab_size);
  // FromTokenFile for .tok/.i32 paths, else FromText (tokenizer required then).
  static StatusOr<TokenCorpus> Load(const std::string& path, const Tokenizer* tokenizer,
                                    int64_t vocab_size);
  explicit TokenCorpus(std::vector<int32_t> tokens);

  size_t size() const { return size_; }
  // Ids [first, first + n) into out.
  Status Read(size_t first, size_t n, int32_t* out) const;
  int64_t documents() const { return documents_; }
  // UnigramEntropy of the tokens, computed when the corpus was made.
  double unigram_entropy() const { return unigram_entropy_; }

  // Writes sequences [first, first + count) of step `step`'s global batch, each seq + 1 tokens
  // (inputs and shifted targets), to out[count][seq + 1]. InvalidArgument when the corpus is
  // shorter than seq + 1 tokens.
  Status Batch(uint64_t seed, int64_t step, int64_t first, int64_t count, int64_t seq,
               int32_t* out) const;

 private:
  struct File;  // an open token file
  TokenCorpus() = default;

  std::vector<int32_t> owned_;  // text corpora: the ids, in memory
  std::shared_ptr<File> file_;  // token files: read per batch
  size_t size_ = 0;
  int64_t documents_ = 0;
  double unigram_entropy_ = 0;
};

// Entropy in nats of the corpus's unigram token distribution: the loss a model that ignores
// context could reach. Training must go well below it. Token ids are >= 0.
double UnigramEntropy(std::span<const int32_t> tokens);

}  // namespace strata::runtime
