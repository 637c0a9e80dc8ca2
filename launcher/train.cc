// `strata train`: RAM-centric, data-parallel training across the ranks of an mpirun/srun launch.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <tuple>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "base/clock.h"
#include "base/cpus.h"
#include "base/env.h"
#include "base/thread_pool.h"
#include "comm/communicator.h"
#include "checkpoint/snapshot_ec.h"
#include "comm/transport/mpi/mpi_transport.h"
#include "comm/transport/tcp/tcp_transport.h"
#include "kernels/cpu/sgemm.h"
#include "launcher/commands.h"
#include "launcher/train_snapshot.h"
#include "memory/param_store.h"
#include "parallel/dp_trainer.h"
#include "runtime/file_util.h"
#include "runtime/hf_model.h"
#include "runtime/llama_config.h"
#include "runtime/safetensors.h"
#include "runtime/tokenizer.h"
#include "runtime/train_data.h"
#include "runtime/trainer.h"

namespace strata::launcher {
namespace {

namespace fs = std::filesystem;

struct TrainArgs {
  std::string model;
  std::string config;
  std::string tokenizer;
  std::string data;
  std::string save;
  std::string dump_grads;
  std::string transport = "mpi";
  std::string stage = "auto";
  std::string precision = "f32";
  std::string device = "cpu";
  int threads = 0;
  bool json = false;
  bool no_optimizer_overlap = false;
  bool memory_report = false;
  uint64_t init_seed = 0;
  std::string run;
  int snapshot_every = 1;
  std::string snapshot_dir;
  int persist_every = 0;
  std::string resume = "never";
  std::string ec;    // "k,m"; empty: DefaultEcGroup of the node count; "0,0": off
  int ec_port = 0;   // 0: derived from the run name
  int64_t fail_at_step = 0;
  int fail_rank = 0;
  parallel::DpTrainOptions o;
};

// What a snapshot must match to be resumed: the model's config and parameter layout.
uint64_t ModelFingerprint(const runtime::LlamaConfig& config, const memory::ParamLayout& layout) {
  std::string key = runtime::LlamaConfigJson(config);
  for (const memory::ParamEntry& e : layout.entries()) {
    key += e.name;
    for (int64_t d : e.shape) key += "," + std::to_string(d);
    key += ";";
  }
  uint64_t h = 1469598103934665603ULL;  // FNV-1a 64
  for (unsigned char c : key) h = (h ^ c) * 1099511628211ULL;
  return h;
}

// The TCP port every node's snapshotd serves its peers on: derived from the run name so that a
// relaunch (and a snapshotd that outlived the trainer) agree on it without any exchange. In
// [20000, 32000): below Linux's ephemeral range, so outgoing connections never hold it.
int EcPortOf(const std::string& run) {
  uint64_t h = 1469598103934665603ULL;  // FNV-1a 64
  for (unsigned char c : run) h = (h ^ c) * 1099511628211ULL;
  return 20000 + static_cast<int>(h % 12000);
}

std::string Bytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4) {
    b /= 1024;
    ++u;
  }
  return fmt::format("{:.1f} {}", b, units[u]);
}

std::string Duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const int64_t t = static_cast<int64_t>(s + 0.5);
  if (t >= 3600) return fmt::format("{}h{:02}m", t / 3600, t / 60 % 60);
  if (t >= 60) return fmt::format("{}m{:02}s", t / 60, t % 60);
  return fmt::format("{}s", t);
}

int64_t MemAvailableBytes() {
  std::ifstream in("/proc/meminfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("MemAvailable:", 0) == 0) return std::stoll(line.substr(13)) * 1024;
  }
  return -1;
}

// A new model's config: a config.json-style size description; vocab and special ids come from
// the tokenizer when the file does not give them.
StatusOr<runtime::LlamaConfig> NewModelConfig(const std::string& path,
                                              const runtime::Tokenizer* tok) {
  STRATA_ASSIGN_OR_RETURN(std::string text, runtime::ReadFileToString(path));
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) return Status::InvalidArgument(path + ": not a JSON object");
  if (!j.contains("model_type") && !j.contains("architectures")) j["model_type"] = "llama";
  if (tok != nullptr) {
    if (!j.contains("vocab_size")) j["vocab_size"] = tok->vocab_size();
    if (!j.contains("bos_token_id") && tok->bos_id() >= 0) j["bos_token_id"] = tok->bos_id();
    if (!j.contains("eos_token_id") && tok->eos_id() >= 0) j["eos_token_id"] = tok->eos_id();
  }
  return runtime::ParseLlamaConfig(j.dump(), path);
}

// Dumps the gradients of step 1 (summed over ranks) as safetensors, on rank 0.
Status DumpGradients(const std::string& path, memory::ParamStore& store, comm::Communicator& comm) {
  float* g = store.grads();
  if (comm.size() > 1) {
    comm::CollectiveOptions co;
    co.algorithm = comm::Algorithm::kRing;
    STRATA_RETURN_IF_ERROR(comm.Allreduce(g, g, store.layout().total(), DType::kF32, co));
  }
  if (comm.rank() != 0) return Status::OK();
  std::vector<std::pair<runtime::TensorInfo, const void*>> tensors;
  for (const memory::ParamEntry& e : store.layout().entries()) {
    runtime::TensorInfo info;
    info.name = e.name;
    info.shape = e.shape;
    info.bytes = e.numel * sizeof(float);
    tensors.emplace_back(std::move(info), g + e.offset);
  }
  return runtime::WriteSafetensors(path, tensors, {{"content", "gradients of step 1"}});
}

int RunTrain(TrainArgs a) {
  Status st = comm::mpi::EnsureInitialized(nullptr, nullptr);
  if (!st.ok()) {
    std::fprintf(stderr, "strata train: %s\n", st.ToString().c_str());
    return 1;
  }
  StatusOr<comm::TransportKind> tk = comm::ParseTransportKind(a.transport);
  if (!tk.ok()) {
    std::fprintf(stderr, "strata train: %s\n", tk.status().ToString().c_str());
    return 1;
  }
  StatusOr<std::unique_ptr<comm::Communicator>> c = comm::CreateFromMpi(MPI_COMM_WORLD, *tk);
  if (!c.ok()) {
    std::fprintf(stderr, "strata train: %s\n", c.status().ToString().c_str());
    return 1;
  }
  comm::Communicator& comm = **c;
  const int rank = comm.rank(), size = comm.size();
  // Every rank checks the same inputs, so every rank fails the same way; rank 0 says it.
  auto fail = [&](const Status& s) {
    if (rank == 0) std::fprintf(stderr, "strata train: %s\n", s.ToString().c_str());
    return 1;
  };
  // A failure after work started may leave other ranks inside a collective: end the job.
  auto abort_all = [&](const Status& s) {
    std::fprintf(stderr, "strata train (rank %d): %s\n", rank, s.ToString().c_str());
    MPI_Abort(MPI_COMM_WORLD, 1);
    return 1;
  };

  // ---- everything that can be wrong with the inputs, before any work ----
  if (a.model.empty() == a.config.empty()) {
    return fail(Status::InvalidArgument("give exactly one of --model DIR and --config FILE"));
  }
  if (a.data.empty()) return fail(Status::InvalidArgument("--data FILE is required"));
  if (a.o.steps < 1) return fail(Status::InvalidArgument("--steps must be >= 1"));
  if (!(a.o.lr > 0)) return fail(Status::InvalidArgument("--lr must be > 0"));
  if (a.resume != "never" && a.resume != "auto") {
    return fail(Status::InvalidArgument("--resume must be never or auto"));
  }
  if (a.resume == "auto" && a.snapshot_every <= 0 && a.snapshot_dir.empty()) {
    return fail(Status::InvalidArgument("--resume auto needs snapshots (--snapshot-every > 0)"));
  }
  int ec_k = -1, ec_m = -1;  // -1: DefaultEcGroup of the node count
  if (!a.ec.empty()) {
    char extra = 0;
    if (std::sscanf(a.ec.c_str(), "%d,%d%c", &ec_k, &ec_m, &extra) != 2 || ec_k < 0 || ec_m < 0 ||
        (ec_k == 0) != (ec_m == 0)) {
      return fail(Status::InvalidArgument(
          fmt::format("--ec wants k,m with k, m >= 1 (e.g. 2,1), or 0,0 for no erasure coding; "
                      "got '{}'", a.ec)));
    }
  }
  const comm::Topology& topo = comm.topology();
  if (topo.num_nodes > 1 && ec_k < 0) std::tie(ec_k, ec_m) = checkpoint::DefaultEcGroup(topo.num_nodes);
  if (topo.num_nodes > 1 && ec_k > 0 && topo.num_nodes % (ec_k + ec_m) != 0) {
    return fail(Status::InvalidArgument(fmt::format(
        "--ec {},{} does not fit the {} nodes of this job: groups of k + m = {} nodes must "
        "divide the node count (--ec 0,0: no erasure coding)",
        ec_k, ec_m, topo.num_nodes, ec_k + ec_m)));
  }
  if (a.ec_port < 0 || a.ec_port > 65535) {
    return fail(Status::InvalidArgument("--ec-port must be in 0..65535"));
  }
  if (a.stage == "copy") {
    a.o.stage = runtime::StageMode::kCopy;
  } else if (a.stage == "zero-copy") {
    a.o.stage = runtime::StageMode::kZeroCopy;
  } else if (a.stage != "auto") {
    return fail(Status::InvalidArgument("--stage must be auto, zero-copy or copy"));
  }
  if (StatusOr<runtime::Precision> p = runtime::ParsePrecision(a.precision); p.ok()) {
    a.o.precision = *p;
  } else {
    return fail(Status::InvalidArgument("--precision: " + p.status().message()));
  }
  a.o.overlap_optimizer = !a.no_optimizer_overlap;
  std::string bf16_impl;
  bool bf16_native = false;
  if (a.device != "cpu" && a.device != "cuda" && a.device.rfind("cuda:", 0) != 0) {
    return fail(Status::InvalidArgument(
        fmt::format("--device must be cpu, cuda or cuda:N, not '{}'", a.device)));
  }
  if (a.o.precision == runtime::Precision::kBF16 && a.device == "cpu") {
    // Refused up front, never a silent fallback to f32.
    if (Status s = kernels::cpu::GemmBF16Support(&bf16_impl, &bf16_native); !s.ok()) {
      return fail(Status::FailedPrecondition("--precision bf16: " + s.message() +
                                             "; use --precision f32"));
    }
  }
  std::unique_ptr<runtime::HfModel> model;
  runtime::LlamaConfig config;
  std::string tok_path = a.tokenizer;
  if (!a.model.empty()) {
    StatusOr<std::unique_ptr<runtime::HfModel>> m = runtime::HfModel::Open(a.model);
    if (!m.ok()) return fail(m.status());
    model = std::move(*m);
    config = model->config();
    if (tok_path.empty()) tok_path = model->tokenizer_path();
  }
  std::unique_ptr<runtime::Tokenizer> tok;
  if (!tok_path.empty()) {
    StatusOr<std::unique_ptr<runtime::Tokenizer>> t = runtime::Tokenizer::Load(tok_path);
    if (!t.ok()) return fail(t.status());
    tok = std::move(*t);
  }
  if (!a.config.empty()) {
    StatusOr<runtime::LlamaConfig> cfg = NewModelConfig(a.config, tok.get());
    if (!cfg.ok()) return fail(cfg.status());
    config = *cfg;
  }
  if (tok && tok->vocab_size() > config.vocab_size) {
    return fail(Status::InvalidArgument(fmt::format(
        "the tokenizer has {} pieces but the model's vocabulary only {}", tok->vocab_size(),
        config.vocab_size)));
  }
  if (a.o.seq > config.max_position_embeddings) {
    return fail(Status::InvalidArgument(fmt::format(
        "--seq {} is longer than the model allows (max_position_embeddings {})", a.o.seq,
        config.max_position_embeddings)));
  }
  StatusOr<runtime::TokenCorpus> corpus =
      runtime::TokenCorpus::Load(a.data, tok.get(), config.vocab_size);
  if (!corpus.ok()) return fail(corpus.status());
  if (static_cast<int64_t>(corpus->size()) < a.o.seq + 1) {
    return fail(Status::InvalidArgument(fmt::format(
        "{} has {} tokens, fewer than one sequence of --seq {} + 1", a.data, corpus->size(),
        a.o.seq)));
  }
  // Ranks on one node share its memory (and its cores).
  const int local_ranks = std::max(1, comm.topology().local_size);
  std::string cpu_note;
  const int threads = a.threads > 0 ? a.threads : DefaultRankThreads(local_ranks, &cpu_note);
  if (!cpu_note.empty()) {
    std::fprintf(stderr, "strata train: rank %d: %s\n", rank, cpu_note.c_str());
  }
  ThreadPool pool(threads);
  // The compute device: the CPU, or a GPU ("cuda": the node's GPU number local_rank, so each
  // rank of a node takes its own).
  std::unique_ptr<runtime::Device> device;
  {
    const std::string spec =
        a.device == "cuda" ? fmt::format("cuda:{}", topo.local_rank) : a.device;
    StatusOr<std::unique_ptr<runtime::Device>> d = runtime::MakeDevice(spec, &pool);
    if (!d.ok()) return abort_all(d.status().WithContext("--device " + a.device));
    device = std::move(*d);
    if (a.o.precision == runtime::Precision::kBF16) {
      if (Status s = device->Bf16Support(); !s.ok()) {
        return abort_all(Status::FailedPrecondition("--precision bf16: " + s.message() +
                                                    "; use --precision f32"));
      }
    }
    a.o.device = device.get();
  }
  StatusOr<memory::ParamLayout> layout = runtime::LlamaParamLayout(config, size);
  if (!layout.ok()) return fail(layout.status());
  runtime::ExecutorOptions eo;
  eo.batch = a.o.micro_batch > 0 ? a.o.micro_batch : a.o.batch / std::max(1, size);
  eo.seq = a.o.seq;
  eo.anchor_every = a.o.anchor_every;
  eo.ce_chunk_tokens = a.o.ce_chunk_tokens;
  eo.stage = a.o.stage;
  eo.precision = a.o.precision;
  eo.device = device.get();
  const runtime::ExecutorMemory em = runtime::TrainExecutor::Estimate(config, eo);
  const size_t store_bytes = (2 * layout->total() + 2 * layout->slice_size()) * sizeof(float);
  // A GPU holds the executor's buffers itself: host RAM then needs only the page-locked staging.
  const size_t device_free = device->FreeMemory();
  const size_t on_device = device_free > 0 ? em.total() - em.host_staging : 0;
  if (device_free > 0 && on_device > device_free) {
    return abort_all(Status::ResourceExhausted(fmt::format(
        "{} has {} free, but this run's activations, workspaces, staged layers and LM head need "
        "{} there. Use a smaller --batch/--micro-batch or --seq, a larger --anchor-every, or "
        "--precision bf16.",
        device->name(), Bytes(static_cast<double>(device_free)),
        Bytes(static_cast<double>(on_device)))));
  }
  const double need = static_cast<double>(store_bytes + em.total() - on_device);
  const int64_t avail = MemAvailableBytes();
  if (avail > 0 && need * local_ranks > static_cast<double>(avail)) {
    return fail(Status::ResourceExhausted(fmt::format(
        "this run needs {} per rank ({} parameters: {} for weights and gradients, {} for this "
        "rank's AdamW moments; {} activations and workspaces), {} for the {} ranks on this node, "
        "but only {} is available. Use fewer ranks per node, a smaller --batch/--micro-batch or "
        "--seq, or a larger --anchor-every.",
        Bytes(need), layout->num_params(), Bytes(2.0 * layout->total() * 4),
        Bytes(2.0 * layout->slice_size() * 4), Bytes(static_cast<double>(em.total() - on_device)),
        Bytes(need * local_ranks), local_ranks, Bytes(static_cast<double>(avail)))));
  }

  // ---- the run ----
  memory::ParamStoreOptions so;
  so.rank = rank;
  StatusOr<std::unique_ptr<memory::ParamStore>> store =
      memory::ParamStore::Create(std::move(*layout), so);
  if (!store.ok()) return abort_all(store.status());
  memory::ParamStore& ps = **store;
  // The starting weights: the --model folder's, or a fresh init. A run that resumes from a
  // snapshot overwrites every one of them, so it skips this (seconds of random numbers for a
  // 200M model, while a rebuilding node waits for the job to ask for its snapshot).
  auto initial_params = [&]() -> Status {
    if (model) return runtime::LoadLlamaParams(ps, *model);
    runtime::InitLlamaParams(ps, a.init_seed);  // same seed on every rank: identical replicas
    return Status::OK();
  };
  const bool may_resume = a.snapshot_every > 0 || a.resume == "auto";
  if (!may_resume) {
    if (Status s = initial_params(); !s.ok()) return abort_all(s);
  }
  StatusOr<std::unique_ptr<parallel::DpTrainer>> trainer =
      parallel::DpTrainer::Create(config, &ps, &comm, a.o, &pool);
  if (!trainer.ok()) return fail(trainer.status());
  parallel::DpTrainer& tr = **trainer;

  if (rank == 0) {
    std::fprintf(stderr,
                 "strata train: %zu parameters, %lld layers, vocab %lld; %d rank(s) x %d "
                 "thread(s); global batch %lld x %lld tokens; corpus %zu tokens (unigram "
                 "entropy %.3f nats)\n",
                 ps.layout().num_params(), static_cast<long long>(config.num_hidden_layers),
                 static_cast<long long>(config.vocab_size), size, threads,
                 static_cast<long long>(a.o.batch), static_cast<long long>(a.o.seq),
                 corpus->size(), corpus->unigram_entropy());
    std::fprintf(stderr, "strata train: AdamW %s\n",
                 tr.overlapped()
                     ? "runs on each layer as soon as its gradients are final, overlapped with "
                       "the rest of the backward"
                     : (a.o.clip > 0 ? "runs after the backward (--clip needs the global "
                                       "gradient norm; --clip 0 overlaps it with the backward)"
                                     : "runs after the backward (--no-optimizer-overlap)"));
    if (!device->host_memory()) {
      std::fprintf(stderr,
                   "strata train: computing on %s; host RAM keeps the master weights, "
                   "gradients and AdamW, layers are uploaded double-buffered\n",
                   device->name().c_str());
    }
    if (a.o.precision == runtime::Precision::kBF16 && device->host_memory()) {
      std::fprintf(stderr,
                   "strata train: precision bf16: bf16 working copies and matrix products with "
                   "f32 accumulation (oneDNN %s%s); f32 master weights, gradients and AdamW\n",
                   bf16_impl.c_str(),
                   bf16_native ? "" : ", emulated: this CPU lacks AVX512-BF16, expect it slower "
                                      "than f32");
    }
  }
  if (a.memory_report && rank == 0) {
    const runtime::ExecutorMemory m = tr.executor().memory();
    // On a discrete device the executor's buffers are device memory, not host RAM.
    const bool host = device->host_memory();
    const std::string where = host ? "" : " (on " + device->name() + ")";
    std::fprintf(stderr,
                 "memory report (rank 0, host RAM unless marked):\n"
                 "  parameters (f32 master)   %12s\n"
                 "  gradients                 %12s\n"
                 "  AdamW moments (own slice) %12s\n"
                 "  activations (anchors)     %12s%s\n"
                 "  layer workspace           %12s%s\n"
                 "  staging slots             %12s%s\n"
                 "  loss chunk                %12s%s\n"
                 "  page-locked staging       %12s\n"
                 "  step buffers (DP)         %12s\n"
                 "  total                     %12s\n",
                 Bytes(ps.weights_bytes()).c_str(), Bytes(ps.weights_bytes()).c_str(),
                 Bytes(ps.moments_bytes()).c_str(), Bytes(m.anchors).c_str(), where.c_str(),
                 Bytes(m.workspace).c_str(), where.c_str(), Bytes(m.staging).c_str(),
                 where.c_str(), Bytes(m.loss_scratch).c_str(), where.c_str(),
                 Bytes(m.host_staging).c_str(), Bytes(tr.buffer_bytes()).c_str(),
                 Bytes(ps.arena_bytes() + (host ? m.total() : m.host_staging) +
                       tr.buffer_bytes())
                     .c_str());
  }
  // Snapshots: this node's snapshotd holds them; --resume auto continues from the newest.
  std::unique_ptr<TrainSnapshotter> snap;
  int64_t first_step = 1;
  if (may_resume) {
    TrainSnapshotOptions sopt;
    sopt.run = a.run.empty() ? DefaultRunName(a.model.empty() ? a.config : a.model, a.data) : a.run;
    sopt.every = a.snapshot_every;
    sopt.persist_dir = a.snapshot_dir;
    sopt.persist_every = a.persist_every;
    sopt.local_ranks = local_ranks;
    if (topo.num_nodes > 1) {
      // Several nodes. Every rank says where its node's snapshotd would listen for the other
      // nodes' (the address of the interface the job's traffic uses: STRATA_TCP_IFNAME, as for
      // the tcp transport) and which kernel it runs on; a node's entry is its lowest rank's.
      struct NodeInfo {
        char addr[64];
        char boot_id[64];
      } mine{};
      StatusOr<std::string> addr =
          comm::tcp::ResolveInterfaceAddress(EnvString("STRATA_TCP_IFNAME"), false);
      if (!addr.ok() && ec_k > 0) {
        return abort_all(addr.status().WithContext("address for the snapshotd peers"));
      }
      std::snprintf(mine.addr, sizeof(mine.addr), "%s", addr.ok() ? addr->c_str() : "");
      std::ifstream("/proc/sys/kernel/random/boot_id").getline(mine.boot_id, sizeof(mine.boot_id));
      std::vector<NodeInfo> all(static_cast<size_t>(size));
      if (Status g = comm.Allgather(&mine, all.data(), sizeof(mine)); !g.ok()) return abort_all(g);
      std::vector<const NodeInfo*> node_info(static_cast<size_t>(topo.num_nodes), nullptr);
      for (int r = 0; r < size; ++r) {
        const NodeInfo*& n = node_info[static_cast<size_t>(topo.node_of_rank[static_cast<size_t>(r)])];
        if (n == nullptr) n = &all[static_cast<size_t>(r)];
      }
      // "Nodes" that share one kernel (network namespaces or containers on one machine) share
      // /tmp and /dev/shm too: then each node's snapshotd gets its own socket and shared-memory
      // names. Real machines keep the plain names (a snapshotd started by a Slurm step is found).
      bool shared_kernel = false;
      for (int i = 0; i < topo.num_nodes; ++i) {
        for (int j = i + 1; j < topo.num_nodes; ++j) {
          shared_kernel = shared_kernel || std::string(node_info[static_cast<size_t>(i)]->boot_id) ==
                                               node_info[static_cast<size_t>(j)]->boot_id;
        }
      }
      sopt.node = topo.node;
      if (shared_kernel) sopt.node_tag = fmt::format("n{}", topo.node);
      // A shared --snapshot-dir (the usual case on a cluster file system) gets a folder per node.
      if (!sopt.persist_dir.empty()) {
        sopt.persist_dir = (fs::path(sopt.persist_dir) / fmt::format("node{}", topo.node)).string();
      }
      // Each node persists in the background, and one whose writer is slow can be two persisted
      // versions behind another when the job dies (its slots stay pinned until the write is
      // done, which stalls it no further). Keeping four leaves a disk version every node holds.
      sopt.persist_keep = 4;
      if (ec_k > 0) {
        const int port = a.ec_port > 0 ? a.ec_port : EcPortOf(sopt.run);
        for (const NodeInfo* n : node_info) sopt.peers.push_back(fmt::format("{}:{}", n->addr, port));
        sopt.ec_k = ec_k;
        sopt.ec_m = ec_m;
        if (rank == 0) {
          std::fprintf(stderr,
                       "strata train: %d nodes; snapshots erasure-coded in groups of %d+%d (any "
                       "%d lost node%s of a group rebuilt from the others); snapshotd peers %s\n",
                       topo.num_nodes, ec_k, ec_m, ec_m, ec_m == 1 ? "" : "s",
                       fmt::format("{}", fmt::join(sopt.peers, ",")).c_str());
        }
      }
    }
    sopt.strata_binary = "/proc/self/exe";
    char exe[4096];
    const ssize_t len = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (len > 0) sopt.strata_binary.assign(exe, static_cast<size_t>(len));
    StatusOr<std::unique_ptr<TrainSnapshotter>> sn = TrainSnapshotter::Start(
        sopt, &ps, rank, size, ModelFingerprint(config, ps.layout()), a.o.seed);
    if (!sn.ok()) return abort_all(sn.status());
    snap = std::move(*sn);
    // A snapshotd restarted after a crash rebuilds its view from the shared memory as ranks
    // register: ask for the newest version only once every rank has.
    if (Status b = comm.Barrier(); !b.ok()) return abort_all(b);
    const uint64_t t_restore = NowNs();
    StatusOr<JobResume> r = AgreeOnResume(*snap, comm, !a.snapshot_dir.empty());
    if (!r.ok()) return abort_all(r.status());
    if (r->step > 0 && a.resume != "auto") {
      return fail(Status::FailedPrecondition(fmt::format(
          "run '{}' has a committed snapshot of step {}: pass --resume auto to continue it, or "
          "--run NAME to start another run", sopt.run, r->step)));
    }
    if (r->step > 0) {
      const uint64_t t_agreed = NowNs();
      // One node: its snapshotd's memory (or disk folder) holds every rank's slice of the
      // weights, and a copy from there beats an all-gather through MPI. Across nodes each
      // node holds only its own ranks', so the ranks all-gather.
      const bool one_node = topo.num_nodes == 1;
      if (Status l = snap->Load(/*all_weights=*/one_node); !l.ok()) return abort_all(l);
      if (!snap->repair_note().empty()) {
        std::fprintf(stderr, "strata train: %s\n", snap->repair_note().c_str());
      }
      const uint64_t t_loaded = NowNs();
      if (!one_node) {
        if (Status g = tr.GatherWeights(); !g.ok()) return abort_all(g);
      }
      const uint64_t t_gathered = NowNs();
      first_step = r->step + 1;
      if (rank == 0) {
        const size_t state = 3 * ps.slice_size() * sizeof(float) * static_cast<size_t>(size);
        std::fprintf(stderr,
                     "strata train: run '%s' resumed after step %lld from %s (%s of state "
                     "restored in %.3f s: finding and agreeing on the version %.3f s, %s)\n",
                     sopt.run.c_str(), static_cast<long long>(r->step), r->source.c_str(),
                     Bytes(static_cast<double>(state)).c_str(),
                     static_cast<double>(NowNs() - t_restore) / 1e9,
                     static_cast<double>(t_agreed - t_restore) / 1e9,
                     (one_node
                          ? fmt::format("copying and checking rank 0's shard and the other "
                                        "ranks' weights {:.3f} s", (t_loaded - t_agreed) / 1e9)
                          : fmt::format("copying and checking rank 0's shard {:.3f} s, "
                                        "gathering the weights {:.3f} s",
                                        (t_loaded - t_agreed) / 1e9,
                                        (t_gathered - t_loaded) / 1e9))
                         .c_str());
        for (const std::string& remark : r->remarks) {
          std::fprintf(stderr, "strata train: %s\n", remark.c_str());
        }
      }
    } else {
      if (Status s = initial_params(); !s.ok()) return abort_all(s);
      if (rank == 0 && a.resume == "auto") {
        std::fprintf(stderr, "strata train: run '%s' has no snapshot yet; starting at step 1\n",
                     sopt.run.c_str());
      }
    }
    tr.set_before_update([s = snap.get()] { return s->Fence(); });
  }

  if (!a.dump_grads.empty()) {
    StatusOr<double> l = tr.ComputeGradients(*corpus, 1);
    if (!l.ok()) return abort_all(l.status());
    if (Status s = DumpGradients(a.dump_grads, ps, comm); !s.ok()) return abort_all(s);
    if (rank == 0) std::fprintf(stderr, "strata train: gradients of step 1 in %s\n", a.dump_grads.c_str());
  }

  const bool tty = isatty(STDERR_FILENO);
  const uint64_t t_start = NowNs();
  double last_loss = 0;
  for (int64_t step = first_step; step <= a.o.steps; ++step) {
    StatusOr<parallel::StepStats> s = tr.Step(*corpus, step);
    if (!s.ok()) return abort_all(s.status());
    if (snap) {
      if (Status sst = snap->AfterStep(step); !sst.ok()) return abort_all(sst);
    }
    if (a.fail_at_step == step && a.fail_rank == rank) {
      // Fault injection: die like a crashed rank, mid-job, without any cleanup. Wait for the
      // snapshot of this step first so the test knows which version must survive.
      if (snap) (void)snap->Fence();
      std::fprintf(stderr, "strata train: rank %d kills itself after step %lld (--fail-at-step)\n",
                   rank, static_cast<long long>(step));
      ::raise(SIGKILL);
    }
    last_loss = s->loss;
    const double tps = static_cast<double>(a.o.batch * a.o.seq) / s->seconds;
    int64_t rss = PeakRssBytes();
    std::vector<int64_t> all_rss(static_cast<size_t>(size));
    if (Status g = comm.Allgather(&rss, all_rss.data(), sizeof(rss)); !g.ok()) return abort_all(g);
    if (rank != 0) continue;
    if (a.json) {
      nlohmann::ordered_json j;
      j["step"] = step;
      j["loss"] = s->loss;
      j["tokens_per_s"] = tps;
      j["peak_rss_bytes"] = all_rss;
      j["lr"] = s->lr;
      j["grad_norm"] = s->grad_norm;
      j["step_s"] = s->seconds;
      j["compute_s"] = s->compute_seconds;
      j["comm_s"] = s->comm_seconds;
      j["optimizer_s"] = s->optimizer_seconds;
      std::printf("%s\n", j.dump().c_str());
      std::fflush(stdout);
    }
    const double elapsed = static_cast<double>(NowNs() - t_start) / 1e9;
    const double eta = elapsed / static_cast<double>(step - first_step + 1) *
                       static_cast<double>(a.o.steps - step);
    const std::string line = fmt::format("step {}/{}  loss {:.4f}  {:.0f} tok/s  lr {:.2e}  ETA {}",
                                         step, a.o.steps, s->loss, tps, s->lr, Duration(eta));
    if (tty) {
      std::fprintf(stderr, "\r%s   ", line.c_str());
      if (step == a.o.steps) std::fputc('\n', stderr);
    } else if (step == 1 || step == a.o.steps || step % std::max<int64_t>(1, a.o.steps / 20) == 0) {
      std::fprintf(stderr, "%s\n", line.c_str());
    }
  }
  const double total_s = static_cast<double>(NowNs() - t_start) / 1e9;
  if (rank == 0) {
    std::fprintf(stderr, "strata train: %lld steps in %s, final loss %.4f, peak RSS %s (rank 0)\n",
                 static_cast<long long>(a.o.steps), Duration(total_s).c_str(), last_loss,
                 Bytes(static_cast<double>(PeakRssBytes())).c_str());
    if (!a.save.empty()) {
      if (Status s = runtime::SaveHfFolder(ps, config, a.save, tok_path); !s.ok()) {
        return abort_all(s);
      }
      std::fprintf(stderr, "strata train: saved the model to %s (strata shard --model %s ...)\n",
                   a.save.c_str(), a.save.c_str());
    }
  }
  if (snap) {
    if (Status s = snap->Fence(); !s.ok()) return abort_all(s);
    if (rank == 0 && snap->snapshots() > 0) {
      const double bytes = 3.0 * static_cast<double>(ps.slice_size()) * sizeof(float);
      std::fprintf(stderr,
                   "strata train: %lld snapshots of %s per rank, %.3f s each on average "
                   "(copy + checksum + publish, overlapped), %.2f GB/s per rank%s\n",
                   static_cast<long long>(snap->snapshots()), Bytes(bytes).c_str(),
                   snap->copy_seconds() / static_cast<double>(snap->snapshots()),
                   bytes * static_cast<double>(snap->snapshots()) / snap->copy_seconds() / 1e9,
                   snap->reconnects() > 0 ? "; snapshotd was restarted during the run" : "");
    }
  }
  if (Status s = comm.Barrier(); !s.ok()) return abort_all(s);
  // The job is over: each node's snapshotd frees its memory and exits.
  if (snap && comm.topology().local_rank == 0) {
    if (Status s = snap->Finish(); !s.ok()) {
      std::fprintf(stderr, "strata train: snapshotd finish: %s\n", s.ToString().c_str());
    }
  }
  return 0;
}

}  // namespace

void AddTrainCommand(CLI::App& root, std::vector<Command>& commands) {
  auto a = std::make_shared<TrainArgs>();
  CLI::App* app = root.add_subcommand(
      "train",
      "Train a Llama-family model, data-parallel across the ranks of an mpirun/srun launch.\n"
      "Host RAM holds the fp32 master weights, gradients and AdamW moments (each rank keeps the\n"
      "moments of its own slice); layers stream through compute one at a time, only layer-\n"
      "boundary activations are kept, and each layer's forward is recomputed for its backward.\n"
      "Examples:\n"
      "  strata train --config small.json --tokenizer sp.model --data corpus.txt --steps 200 \\\n"
      "      --save out/model\n"
      "  mpirun -np 2 strata train --model hf_dir --data corpus.txt --batch 16 --json");
  app->add_option("--model", a->model, "continue training a Hugging Face folder");
  app->add_option("--config", a->config,
                  "start a new model from a config.json-style size description (hidden_size, "
                  "intermediate_size, num_hidden_layers, num_attention_heads, "
                  "num_key_value_heads, max_position_embeddings; vocab_size defaults to the "
                  "tokenizer's)");
  app->add_option("--tokenizer", a->tokenizer,
                  "SentencePiece model for text data (default: the model folder's)");
  app->add_option("--data", a->data,
                  "training text (documents split at blank lines and '%' lines), or "
                  "pre-tokenized little-endian int32 ids in a .tok/.i32 file")
      ->required();
  app->add_option("--steps", a->o.steps, "optimizer steps")->capture_default_str();
  app->add_option("--batch", a->o.batch, "sequences per step, across all ranks")
      ->capture_default_str();
  app->add_option("--micro-batch", a->o.micro_batch,
                  "sequences per forward/backward on a rank (0: the rank's whole share); "
                  "smaller bounds activation memory")
      ->capture_default_str();
  app->add_option("--seq", a->o.seq, "tokens per sequence")->capture_default_str();
  app->add_option("--lr", a->o.lr, "peak learning rate")->capture_default_str();
  app->add_option("--warmup", a->o.warmup, "steps of linear warmup")->capture_default_str();
  app->add_option("--min-lr-ratio", a->o.min_lr_ratio,
                  "cosine decay ends at lr times this")->capture_default_str();
  app->add_option("--weight-decay", a->o.weight_decay, "AdamW decoupled weight decay")
      ->capture_default_str();
  app->add_option("--beta1", a->o.beta1, "AdamW beta1")->capture_default_str();
  app->add_option("--beta2", a->o.beta2, "AdamW beta2")->capture_default_str();
  app->add_option("--clip", a->o.clip,
                  "clip the global gradient norm to this (0: off; then AdamW runs layer by layer "
                  "during the backward, see --no-optimizer-overlap)")
      ->capture_default_str();
  app->add_flag("--no-optimizer-overlap", a->no_optimizer_overlap,
                "with --clip 0, still run AdamW after the whole backward instead of on each "
                "layer as soon as its gradients are final (same results, bit for bit; for "
                "comparisons)");
  app->add_option("--seed", a->o.seed, "data order")->capture_default_str();
  app->add_option("--init-seed", a->init_seed, "weights of a new model (--config)")
      ->capture_default_str();
  app->add_option("--anchor-every", a->o.anchor_every,
                  "keep a layer-boundary activation every K layers (larger: less memory, "
                  "more recomputation)")
      ->capture_default_str();
  app->add_option("--loss-chunk", a->o.ce_chunk_tokens,
                  "tokens per chunk of the LM-head cross-entropy")
      ->capture_default_str();
  app->add_option("--stage", a->stage,
                  "weight staging: auto, zero-copy, or copy (double-buffered copies, the "
                  "discrete-device data path)")
      ->capture_default_str();
  app->add_option("--device", a->device,
                  "where the layers compute: cpu, or cuda (each rank of a node on the GPU "
                  "numbered by its local rank) / cuda:N; host RAM stays the parameter store "
                  "either way. cuda needs a build with the CUDA toolkit and a GPU")
      ->capture_default_str();
  app->add_option("--precision", a->precision,
                  "f32, or bf16: layers staged as bf16 working copies and matrix products in "
                  "bf16 with f32 accumulation (LM head included; attention, norms, loss, "
                  "gradients, AdamW and the master weights stay f32). Needs oneDNN bf16 support "
                  "(AVX512-BF16, or emulated on AVX-512); refused otherwise")
      ->capture_default_str();
  app->add_option("--threads", a->threads, "compute threads per rank (0: cores / local ranks)")
      ->capture_default_str();
  app->add_option("--transport", a->transport, "rank-to-rank transport: mpi or tcp")
      ->capture_default_str();
  app->add_option("--run", a->run,
                  "name of this run across relaunches (snapshots are kept under it; default: "
                  "$SLURM_JOB_NAME, else derived from the model/config and data paths)");
  app->add_option("--snapshot-every", a->snapshot_every,
                  "copy this rank's shard of the state into the node's snapshotd every N steps, "
                  "overlapped with the next step (0: no snapshots)")
      ->capture_default_str();
  app->add_option("--snapshot-dir", a->snapshot_dir,
                  "snapshotd also persists snapshots here (see --persist-every)");
  app->add_option("--persist-every", a->persist_every,
                  "persist every N-th snapshot to --snapshot-dir, in the background")
      ->capture_default_str();
  app->add_option("--resume", a->resume,
                  "never, or auto: continue the run from its newest committed snapshot and say "
                  "where it came from: the nodes' snapshotd memory after a crash, a lost node's "
                  "state rebuilt by erasure decoding from the surviving nodes, else disk (with "
                  "the reason)")
      ->capture_default_str();
  app->add_option("--ec", a->ec,
                  "k,m: a job on several nodes erasure-codes every snapshot across groups of "
                  "k + m nodes, so any m lost nodes of a group are rebuilt from the others "
                  "(default from the node count: 2 -> 1,1; 3 -> 2,1; 4..8 -> n-2,2; more: "
                  "groups of 4..8 with m=2; 0,0: node-local snapshots only)");
  app->add_option("--ec-port", a->ec_port,
                  "TCP port the nodes' snapshotds exchange snapshot data on, on the interface "
                  "of STRATA_TCP_IFNAME (0: derived from the run name)")
      ->capture_default_str();
  app->add_option("--fail-at-step", a->fail_at_step,
                  "fault injection: --fail-rank kills itself (SIGKILL) after this step")
      ->group("Fault injection");
  app->add_option("--fail-rank", a->fail_rank, "the rank --fail-at-step kills")
      ->capture_default_str()
      ->group("Fault injection");
  app->add_option("--save", a->save,
                  "write the trained model here as a Hugging Face folder (config.json, "
                  "model.safetensors, tokenizer.model) for strata shard/infer");
  app->add_option("--dump-grads", a->dump_grads,
                  "write the gradients of step 1 (summed over ranks) as safetensors");
  app->add_flag("--json", a->json,
                "print one JSON object per step on stdout (step, loss, tokens_per_s, "
                "peak_rss_bytes per rank, ...)");
  app->add_flag("--memory-report", a->memory_report,
                "print the host-memory breakdown (parameters, gradients, moments, "
                "activations, workspaces) before training");
  commands.push_back({app, [a] { return RunTrain(*a); }});
}

}  // namespace strata::launcher
