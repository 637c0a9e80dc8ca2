#include "runtime/shard_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <isa-l/crc.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <fmt/format.h>

#include "base/dtype.h"
#include "base/logging.h"
#include "kernels/ops.h"
#include "kernels/quant.h"
#include "runtime/file_util.h"
#include "runtime/hf_model.h"

namespace strata::runtime {
namespace {

constexpr char kMagic[8] = {'S', 'T', 'R', 'A', 'T', 'A', 'S', 'H'};

// The first bytes of the header page.
struct Header {
  char magic[8];
  uint32_t version;
  uint32_t manifest_crc32c;
  uint64_t manifest_offset;
  uint64_t manifest_bytes;
};

uint32_t Crc32c(const void* data, size_t n) {
  return crc32_iscsi(static_cast<unsigned char*>(const_cast<void*>(data)), static_cast<int>(n),
                     0xFFFFFFFFu);
}

uint64_t AlignUp(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

Status PwriteAll(int fd, const void* buf, size_t n, uint64_t off, const std::string& path) {
  const char* p = static_cast<const char*>(buf);
  while (n > 0) {
    const ssize_t w = ::pwrite(fd, p, n, static_cast<off_t>(off));
    if (w < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus("write " + path, errno);
    }
    p += w;
    n -= static_cast<size_t>(w);
    off += static_cast<uint64_t>(w);
  }
  return Status::OK();
}

Status PreadAll(int fd, void* buf, size_t n, uint64_t off, const std::string& path) {
  char* p = static_cast<char*>(buf);
  while (n > 0) {
    const ssize_t r = ::pread(fd, p, n, static_cast<off_t>(off));
    if (r < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus("read " + path, errno);
    }
    if (r == 0) return Status::DataLoss(path + ": unexpected end of file (truncated shard?)");
    p += r;
    n -= static_cast<size_t>(r);
    off += static_cast<uint64_t>(r);
  }
  return Status::OK();
}

Status CopyFile(const std::string& from, const std::string& to) {
  std::error_code ec;
  std::filesystem::copy_file(from, to, ec);
  if (ec) return Status::IOError("copy " + from + " -> " + to + ": " + ec.message());
  return FsyncPath(to);
}

// One rank's file being written.
class ShardBuilder {
 public:
  ShardBuilder(std::string path, std::string weight_dtype)
      : path_(std::move(path)), weight_dtype_(std::move(weight_dtype)) {}
  ~ShardBuilder() {
    if (fd_ >= 0) ::close(fd_);
  }

  Status Create() {
    fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd_ < 0) return ErrnoStatus("create " + path_, errno);
    cursor_ = kShardAlign;  // the header page, written last
    return Status::OK();
  }

  // Adds a [rows, cols] f32 matrix in `dtype` ("f32", "bf16", "q8_0"), or a vector in f32.
  StatusOr<proto::TensorEntry> Add(const std::string& name, const std::vector<float>& values,
                                   std::vector<int64_t> shape, const std::string& dtype) {
    std::vector<uint8_t> bytes;
    if (dtype == "f32") {
      bytes.resize(values.size() * 4);
      std::memcpy(bytes.data(), values.data(), bytes.size());
    } else if (dtype == "bf16") {
      bytes.resize(values.size() * 2);
      ConvertBuffer(values.data(), DType::kF32, bytes.data(), DType::kBF16, values.size());
    } else if (dtype == "q8_0") {
      if (shape.size() != 2 || shape[1] % 32 != 0) {
        return Status::InvalidArgument(fmt::format(
            "{}: q8_0 needs the input dimension to be a multiple of 32, this slice is {}", name,
            fmt::join(shape, "x")));
      }
      bytes.resize(kernels::WeightBytes(kernels::WeightType::kQ8_0, shape[0], shape[1]));
      kernels::QuantizeRowsQ8_0(values.data(), bytes.data(), shape[0], shape[1]);
    } else {
      return Status::InvalidArgument("unknown weight dtype '" + dtype + "' (f32, bf16, q8_0)");
    }
    cursor_ = AlignUp(cursor_, 64);
    STRATA_RETURN_IF_ERROR(PwriteAll(fd_, bytes.data(), bytes.size(), cursor_, path_));
    proto::TensorEntry e;
    e.set_name(name);
    e.set_dtype(dtype);
    for (int64_t d : shape) e.add_shape(d);
    e.set_offset(cursor_);
    e.set_bytes(bytes.size());
    e.set_crc32c(Crc32c(bytes.data(), bytes.size()));
    cursor_ += bytes.size();
    return e;
  }

  void BeginBlock() { cursor_ = AlignUp(cursor_, kShardBlockAlign); block_start_ = cursor_; }
  // Blocks are padded to whole pages so that O_DIRECT reads of a block are aligned at both ends.
  void EndBlock(proto::BlockEntry* b) {
    cursor_ = AlignUp(cursor_, kShardAlign);
    b->set_offset(block_start_);
    b->set_bytes(cursor_ - block_start_);
  }

  Status Finish(const proto::ShardManifest& manifest) {
    std::string blob;
    if (!manifest.SerializeToString(&blob)) return Status::Internal("cannot serialize manifest");
    cursor_ = AlignUp(cursor_, kShardAlign);
    STRATA_RETURN_IF_ERROR(PwriteAll(fd_, blob.data(), blob.size(), cursor_, path_));
    std::vector<uint8_t> page(kShardAlign, 0);
    Header h{};
    std::memcpy(h.magic, kMagic, sizeof(kMagic));
    h.version = kShardFormatVersion;
    h.manifest_crc32c = Crc32c(blob.data(), blob.size());
    h.manifest_offset = cursor_;
    h.manifest_bytes = blob.size();
    std::memcpy(page.data(), &h, sizeof(h));
    STRATA_RETURN_IF_ERROR(PwriteAll(fd_, page.data(), page.size(), 0, path_));
    if (::fsync(fd_) != 0) return ErrnoStatus("fsync " + path_, errno);
    // Drop what the writes left in the page cache (clean after the fsync). Written piecemeal,
    // the file sits there in small folios (13% of a q8_0 shard mappable 2 MiB at a time, here),
    // and cached folios are never regrown: the weight window's 2 MiB-hinted mapping then takes
    // 4 KiB entries and TLB misses on every decode step (docs/DECISIONS.md, "Shard blocks
    // aligned to 2 MiB"). Read afresh through that mapping, or by `cat`, the file comes back in
    // 2 MiB folios. Advice only: a failure changes speed, never the file.
    (void)::posix_fadvise(fd_, 0, 0, POSIX_FADV_DONTNEED);
    if (::close(fd_) != 0) {
      fd_ = -1;
      return ErrnoStatus("close " + path_, errno);
    }
    fd_ = -1;
    return Status::OK();
  }

 private:
  std::string path_;
  std::string weight_dtype_;
  int fd_ = -1;
  uint64_t cursor_ = 0;
  uint64_t block_start_ = 0;
};

// Rows [r0, r1) of a [rows, cols] matrix.
std::vector<float> Rows(const std::vector<float>& m, int64_t cols, int64_t r0, int64_t r1) {
  return std::vector<float>(m.begin() + r0 * cols, m.begin() + r1 * cols);
}

// Columns [c0, c1) of a [rows, cols] matrix, as a contiguous [rows, c1 - c0] matrix.
std::vector<float> Cols(const std::vector<float>& m, int64_t rows, int64_t cols, int64_t c0,
                        int64_t c1) {
  std::vector<float> out(static_cast<size_t>(rows * (c1 - c0)));
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(&out[static_cast<size_t>(r * (c1 - c0))], &m[static_cast<size_t>(r * cols + c0)],
                static_cast<size_t>(c1 - c0) * sizeof(float));
  }
  return out;
}

Status WriteRanks(const HfModel& model, const std::vector<proto::RankSlice>& slices,
                  const std::vector<double>& ratios, const std::string& tmp,
                  const ShardWriteOptions& options) {
  const LlamaConfig& c = model.config();
  const int ranks = static_cast<int>(slices.size());
  const int64_t hidden = c.hidden_size, hd = c.head_dim, inter = c.intermediate_size;
  const std::string& wdt = options.weight_dtype;
  std::string config_json;
  {
    std::ifstream in(model.dir() + "/config.json");
    config_json.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  std::vector<std::unique_ptr<ShardBuilder>> builders;
  std::vector<proto::ShardManifest> manifests(static_cast<size_t>(ranks));
  for (int r = 0; r < ranks; ++r) {
    builders.push_back(std::make_unique<ShardBuilder>(ShardPath(tmp, r), wdt));
    STRATA_RETURN_IF_ERROR(builders.back()->Create());
    proto::ShardManifest& m = manifests[static_cast<size_t>(r)];
    m.set_format_version(kShardFormatVersion);
    m.set_model_fingerprint(model.fingerprint());
    m.set_config_json(config_json);
    m.set_rank(r);
    m.set_ranks(ranks);
    for (double x : ratios) m.add_ratios(x);
    m.set_weight_dtype(wdt);
    *m.mutable_slice() = slices[static_cast<size_t>(r)];
  }
  const int64_t total = c.num_hidden_layers * 9 + 3;
  int64_t done = 0;
  auto tick = [&] {
    ++done;
    if (options.progress) options.progress(done, total);
  };
  auto read = [&](const std::string& name, int64_t n) -> StatusOr<std::vector<float>> {
    std::vector<float> v(static_cast<size_t>(n));
    STRATA_RETURN_IF_ERROR(model.ReadF32(name, v.data(), v.size()));
    return v;
  };

  // Rank 0 owns the embedding. The LM head (tied embeddings are written as an explicit head so
  // the engine has one code path) is split by vocabulary rows where the slices say so, and then
  // every rank also keeps the final norm; slices without a vocabulary range (vocab_end 0) give
  // the whole head and the final norm to rank 0, as shards did before the head was split.
  {
    STRATA_ASSIGN_OR_RETURN(std::vector<float> emb,
                            read("model.embed_tokens.weight", c.vocab_size * hidden));
    STRATA_ASSIGN_OR_RETURN(proto::TensorEntry e, builders[0]->Add("model.embed_tokens.weight", emb,
                                                                   {c.vocab_size, hidden}, wdt));
    *manifests[0].add_resident() = e;
    tick();
    const bool split = slices[0].vocab_end() > 0;
    if (split) {
      int64_t at = 0;
      for (const proto::RankSlice& s : slices) {
        if (s.vocab_begin() != at || s.vocab_end() <= s.vocab_begin()) {
          return Status::InvalidArgument("LM head rows of the slices must tile the vocabulary");
        }
        at = s.vocab_end();
      }
      if (at != c.vocab_size) {
        return Status::InvalidArgument(fmt::format(
            "LM head rows of the slices end at {}, the vocabulary has {}", at, c.vocab_size));
      }
    }
    STRATA_ASSIGN_OR_RETURN(std::vector<float> norm, read("model.norm.weight", hidden));
    for (int r = 0; r < (split ? ranks : 1); ++r) {
      STRATA_ASSIGN_OR_RETURN(e, builders[static_cast<size_t>(r)]->Add("model.norm.weight", norm,
                                                                       {hidden}, "f32"));
      *manifests[static_cast<size_t>(r)].add_resident() = e;
    }
    tick();
    if (!c.tie_word_embeddings) {
      STRATA_ASSIGN_OR_RETURN(emb, read("lm_head.weight", c.vocab_size * hidden));
    }
    for (int r = 0; r < (split ? ranks : 1); ++r) {
      const int64_t v0 = split ? slices[static_cast<size_t>(r)].vocab_begin() : 0;
      const int64_t v1 = split ? slices[static_cast<size_t>(r)].vocab_end() : c.vocab_size;
      STRATA_ASSIGN_OR_RETURN(
          e, builders[static_cast<size_t>(r)]->Add("lm_head.weight", Rows(emb, hidden, v0, v1),
                                                   {v1 - v0, hidden}, wdt));
      *manifests[static_cast<size_t>(r)].add_resident() = e;
    }
    tick();
  }

  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = fmt::format("model.layers.{}.", l);
    // Norms are small: every rank keeps them resident.
    for (const char* norm : {"input_layernorm.weight", "post_attention_layernorm.weight"}) {
      STRATA_ASSIGN_OR_RETURN(std::vector<float> w, read(p + norm, hidden));
      for (int r = 0; r < ranks; ++r) {
        STRATA_ASSIGN_OR_RETURN(proto::TensorEntry e,
                                builders[static_cast<size_t>(r)]->Add(p + norm, w, {hidden}, "f32"));
        *manifests[static_cast<size_t>(r)].add_resident() = e;
      }
      tick();
    }
    STRATA_ASSIGN_OR_RETURN(std::vector<float> q,
                            read(p + "self_attn.q_proj.weight", c.num_attention_heads * hd * hidden));
    STRATA_ASSIGN_OR_RETURN(std::vector<float> k,
                            read(p + "self_attn.k_proj.weight", c.num_key_value_heads * hd * hidden));
    STRATA_ASSIGN_OR_RETURN(std::vector<float> v,
                            read(p + "self_attn.v_proj.weight", c.num_key_value_heads * hd * hidden));
    STRATA_ASSIGN_OR_RETURN(std::vector<float> o,
                            read(p + "self_attn.o_proj.weight", hidden * c.num_attention_heads * hd));
    tick(); tick(); tick(); tick();
    STRATA_ASSIGN_OR_RETURN(std::vector<float> gate,
                            read(p + "mlp.gate_proj.weight", inter * hidden));
    STRATA_ASSIGN_OR_RETURN(std::vector<float> up, read(p + "mlp.up_proj.weight", inter * hidden));
    STRATA_ASSIGN_OR_RETURN(std::vector<float> down,
                            read(p + "mlp.down_proj.weight", hidden * inter));
    tick(); tick(); tick();
    for (int r = 0; r < ranks; ++r) {
      const proto::RankSlice& s = slices[static_cast<size_t>(r)];
      ShardBuilder& b = *builders[static_cast<size_t>(r)];
      proto::ShardManifest& m = manifests[static_cast<size_t>(r)];
      const int64_t h0 = s.head_begin() * hd, h1 = s.head_end() * hd;
      const int64_t k0 = s.kv_head_begin() * hd, k1 = s.kv_head_end() * hd;
      proto::BlockEntry* attn = m.add_blocks();
      attn->set_layer(static_cast<int32_t>(l));
      attn->set_kind(proto::BlockEntry::ATTENTION);
      b.BeginBlock();
      struct Part {
        const char* name;
        std::vector<float> values;
        std::vector<int64_t> shape;
      };
      const Part attn_parts[] = {
          {"self_attn.q_proj.weight", Rows(q, hidden, h0, h1), {h1 - h0, hidden}},
          {"self_attn.k_proj.weight", Rows(k, hidden, k0, k1), {k1 - k0, hidden}},
          {"self_attn.v_proj.weight", Rows(v, hidden, k0, k1), {k1 - k0, hidden}},
          {"self_attn.o_proj.weight", Cols(o, hidden, c.num_attention_heads * hd, h0, h1),
           {hidden, h1 - h0}},
      };
      for (const Part& part : attn_parts) {
        STRATA_ASSIGN_OR_RETURN(proto::TensorEntry e,
                                b.Add(p + part.name, part.values, part.shape, wdt));
        *attn->add_tensors() = e;
      }
      b.EndBlock(attn);
      proto::BlockEntry* ffn = m.add_blocks();
      ffn->set_layer(static_cast<int32_t>(l));
      ffn->set_kind(proto::BlockEntry::FFN);
      b.BeginBlock();
      const int64_t f0 = s.ffn_begin(), f1 = s.ffn_end();
      const Part ffn_parts[] = {
          {"mlp.gate_proj.weight", Rows(gate, hidden, f0, f1), {f1 - f0, hidden}},
          {"mlp.up_proj.weight", Rows(up, hidden, f0, f1), {f1 - f0, hidden}},
          {"mlp.down_proj.weight", Cols(down, hidden, inter, f0, f1), {hidden, f1 - f0}},
      };
      for (const Part& part : ffn_parts) {
        STRATA_ASSIGN_OR_RETURN(proto::TensorEntry e,
                                b.Add(p + part.name, part.values, part.shape, wdt));
        *ffn->add_tensors() = e;
      }
      b.EndBlock(ffn);
    }
  }
  for (int r = 0; r < ranks; ++r) {
    STRATA_RETURN_IF_ERROR(builders[static_cast<size_t>(r)]->Finish(manifests[static_cast<size_t>(r)]));
  }
  return Status::OK();
}

}  // namespace

std::string ShardPath(const std::string& dir, int rank) {
  return dir + "/rank-" + std::to_string(rank) + ".shard";
}

Status WriteShardFolder(const HfModel& model, const std::vector<proto::RankSlice>& slices,
                        const std::vector<double>& ratios, const std::string& out_dir,
                        const ShardWriteOptions& options) {
  namespace fs = std::filesystem;
  if (slices.empty()) return Status::InvalidArgument("no ranks to write");
  std::error_code ec;
  if (fs::exists(out_dir, ec)) {
    return Status::AlreadyExists(out_dir + " already exists: remove it or choose another --out");
  }
  const fs::path out = fs::absolute(out_dir);
  const std::string tmp = out.string() + ".tmp-" + std::to_string(::getpid());
  fs::remove_all(tmp, ec);
  if (!fs::create_directories(tmp, ec)) {
    return Status::IOError("cannot create " + tmp + ": " + ec.message());
  }
  Status st = WriteRanks(model, slices, ratios, tmp, options);
  if (st.ok()) st = CopyFile(model.dir() + "/config.json", tmp + "/config.json");
  if (st.ok() && fs::exists(model.dir() + "/tokenizer.model")) {
    st = CopyFile(model.dir() + "/tokenizer.model", tmp + "/tokenizer.model");
  }
  if (st.ok()) st = FsyncPath(tmp);
  if (st.ok() && ::rename(tmp.c_str(), out.c_str()) != 0) {
    st = ErrnoStatus("rename " + tmp + " -> " + out.string(), errno);
  }
  if (st.ok()) st = FsyncPath(out.parent_path().string());
  if (!st.ok()) {
    fs::remove_all(tmp, ec);  // never leave a partial shard folder behind
    return st;
  }
  return Status::OK();
}

StatusOr<std::unique_ptr<ShardFile>> ShardFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoStatus("open shard " + path, errno);
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat sb {};
  if (::fstat(fd, &sb) != 0) return ErrnoStatus("stat " + path, errno);
  auto f = std::unique_ptr<ShardFile>(new ShardFile());
  f->path_ = path;
  f->file_size_ = static_cast<uint64_t>(sb.st_size);
  if (f->file_size_ < kShardAlign) {
    return Status::DataLoss(path + ": " + std::to_string(f->file_size_) +
                            " bytes is too short for a shard file (truncated?)");
  }
  Header h{};
  STRATA_RETURN_IF_ERROR(PreadAll(fd, &h, sizeof(h), 0, path));
  if (std::memcmp(h.magic, kMagic, sizeof(kMagic)) != 0) {
    return Status::InvalidArgument(path + " is not a strata shard file (bad magic)");
  }
  if (h.version != kShardFormatVersion) {
    return Status::InvalidArgument(fmt::format(
        "{}: shard format version {}, this strata reads {}; run `strata shard` again on the "
        "model to rewrite it",
        path, h.version, kShardFormatVersion));
  }
  if (h.manifest_offset > f->file_size_ || h.manifest_bytes > f->file_size_ - h.manifest_offset) {
    return Status::DataLoss(path + ": manifest lies past the end of the file (truncated?)");
  }
  std::string blob(h.manifest_bytes, '\0');
  STRATA_RETURN_IF_ERROR(PreadAll(fd, blob.data(), blob.size(), h.manifest_offset, path));
  if (Crc32c(blob.data(), blob.size()) != h.manifest_crc32c) {
    return Status::Corruption(path + ": manifest checksum mismatch");
  }
  if (!f->manifest_.ParseFromString(blob)) {
    return Status::Corruption(path + ": manifest does not parse");
  }
  auto check = [&](const proto::TensorEntry& e) -> Status {
    if (e.offset() > h.manifest_offset || e.bytes() > h.manifest_offset - e.offset()) {
      return Status::DataLoss(fmt::format("{}: tensor {} lies outside the data section", path,
                                          e.name()));
    }
    return Status::OK();
  };
  for (const auto& e : f->manifest_.resident()) STRATA_RETURN_IF_ERROR(check(e));
  for (const auto& b : f->manifest_.blocks()) {
    if (b.offset() % kShardAlign != 0 || b.offset() + b.bytes() > h.manifest_offset) {
      return Status::DataLoss(fmt::format("{}: block of layer {} is misaligned or out of bounds",
                                          path, b.layer()));
    }
    for (const auto& e : b.tensors()) STRATA_RETURN_IF_ERROR(check(e));
  }
  return f;
}

StatusOr<std::vector<uint8_t>> ShardFile::ReadTensor(const proto::TensorEntry& entry) const {
  const int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoStatus("open shard " + path_, errno);
  std::vector<uint8_t> out(entry.bytes());
  Status st = PreadAll(fd, out.data(), out.size(), entry.offset(), path_);
  ::close(fd);
  STRATA_RETURN_IF_ERROR(st);
  if (Crc32c(out.data(), out.size()) != entry.crc32c()) {
    return Status::Corruption(fmt::format("{}: tensor {} fails its checksum", path_, entry.name()));
  }
  return out;
}

Status ShardFile::VerifyChecksums() const {
  auto verify = [this](const proto::TensorEntry& e) -> Status {
    StatusOr<std::vector<uint8_t>> bytes = ReadTensor(e);
    return bytes.ok() ? Status::OK() : bytes.status();
  };
  for (const auto& e : manifest_.resident()) STRATA_RETURN_IF_ERROR(verify(e));
  for (const auto& b : manifest_.blocks()) {
    for (const auto& e : b.tensors()) STRATA_RETURN_IF_ERROR(verify(e));
  }
  return Status::OK();
}

}  // namespace strata::runtime
