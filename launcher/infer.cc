// `strata infer`: tensor-parallel generation across the ranks of an mpirun/srun launch.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/clock.h"
#include "base/cpus.h"
#include "base/env.h"
#include "base/thread_pool.h"
#include "bench/membw.h"
#include "comm/communicator.h"
#include "comm/transport/mpi/mpi_transport.h"
#include "launcher/commands.h"
#include "launcher/sampling.h"
#include "parallel/tp_engine.h"
#include "runtime/tokenizer.h"

namespace strata::launcher {
namespace {

struct InferArgs {
  std::string shards;
  std::string prompt;
  int max_tokens = 64;
  int64_t context = 0;  // KV cache length; 0 = min(max_position_embeddings, 2048)
  float temperature = 0.8f;
  float top_p = 0.95f;
  uint64_t seed = 0;
  bool greedy = false;
  int window = 2;
  std::string window_mode = "auto";
  bool direct_io = false;
  std::string allreduce = "star";
  std::string transport = "mpi";
  bool json = false;
  std::string dump_logits;
  bool probe_bandwidth = false;
};

int RunInfer(const InferArgs& a) {
  auto fail = [](const Status& st) {
    std::fprintf(stderr, "strata infer: %s\n", st.ToString().c_str());
    return 1;
  };
  StatusOr<comm::Algorithm> algo = comm::ParseAlgorithm(a.allreduce);
  if (!algo.ok()) return fail(algo.status());
  StatusOr<comm::TransportKind> tk = comm::ParseTransportKind(a.transport);
  if (!tk.ok()) return fail(tk.status());
  StatusOr<memory::WindowMode> wm = memory::ParseWindowMode(a.window_mode);
  if (!wm.ok()) return fail(wm.status());
  if (a.max_tokens < 0) return fail(Status::InvalidArgument("--max-tokens must be >= 0"));
  if (!a.greedy && (!(a.temperature > 0) || !(a.top_p > 0) || a.top_p > 1)) {
    return fail(Status::InvalidArgument("--temperature must be > 0 and --top-p in (0, 1]"));
  }
  Status st = comm::mpi::EnsureInitialized(nullptr, nullptr);
  if (!st.ok()) return fail(st);
  auto abort_all = [](const Status& s) {
    std::fprintf(stderr, "strata infer: %s\n", s.ToString().c_str());
    MPI_Abort(MPI_COMM_WORLD, 1);  // other ranks may wait in a collective: end the job
    return 1;
  };
  StatusOr<std::unique_ptr<comm::Communicator>> c = comm::CreateFromMpi(MPI_COMM_WORLD, *tk);
  if (!c.ok()) return abort_all(c.status());
  comm::Communicator& comm = **c;
  const int rank = comm.rank();

  // Rank 0 tokenizes; the others learn the prompt length (and ids) by broadcast.
  std::unique_ptr<runtime::Tokenizer> tok;
  std::vector<int32_t> ids;
  int64_t n_prompt = 0;
  if (rank == 0) {
    StatusOr<std::unique_ptr<runtime::Tokenizer>> t =
        runtime::Tokenizer::Load(a.shards + "/tokenizer.model");
    if (!t.ok()) return abort_all(t.status());
    tok = std::move(*t);
    StatusOr<std::vector<int32_t>> e = tok->Encode(a.prompt, /*add_bos=*/true);
    if (!e.ok()) return abort_all(e.status());
    ids = *e;
    n_prompt = static_cast<int64_t>(ids.size());
  }
  if (Status s = comm.Broadcast(&n_prompt, sizeof(n_prompt), 0); !s.ok()) return abort_all(s);
  if (n_prompt == 0) return abort_all(Status::InvalidArgument("the prompt encodes to no tokens"));
  ids.resize(static_cast<size_t>(n_prompt));
  if (Status s = comm.Broadcast(ids.data(), ids.size() * 4, 0); !s.ok()) return abort_all(s);

  // Threads: STRATA_NUM_THREADS when set, else this rank's share of the node's CPUs, bounded
  // by what the launcher's binding lets it use (and said when that is less than its share).
  std::unique_ptr<ThreadPool> pool;
  if (StatusOr<int64_t> env = EnvInt("STRATA_NUM_THREADS"); !env.ok() || *env == 0) {
    std::string note;
    const int threads = DefaultRankThreads(std::max(1, comm.topology().local_size), &note);
    if (!note.empty()) std::fprintf(stderr, "strata infer: rank %d: %s\n", rank, note.c_str());
    pool = std::make_unique<ThreadPool>(threads);
  }
  parallel::EngineOptions eo;
  eo.pool = pool.get();
  eo.window = a.window;
  eo.window_mode = *wm;
  eo.direct_io = a.direct_io;
  eo.allreduce = *algo;
  eo.max_seq = a.context;
  StatusOr<std::unique_ptr<parallel::TpEngine>> engine = parallel::TpEngine::Open(a.shards, comm, eo);
  if (!engine.ok()) return abort_all(engine.status());
  parallel::TpEngine& e = **engine;
  const int64_t vocab = e.config().vocab_size;
  if (n_prompt + a.max_tokens > e.max_seq()) {
    return abort_all(Status::InvalidArgument(
        "prompt (" + std::to_string(n_prompt) + " tokens) + --max-tokens (" +
        std::to_string(a.max_tokens) + ") exceeds the context of " + std::to_string(e.max_seq()) +
        " tokens (--context raises it, up to the model's max_position_embeddings " +
        std::to_string(e.config().max_position_embeddings) + ")"));
  }

  // --probe-bandwidth: one pass of `strata bench membw`'s streaming read over a buffer of this
  // rank's weight bytes per token after every decode step, all ranks together, kept out of the
  // decode timing. Bandwidth on these machines drifts by 2x within seconds; probed between
  // tokens, decode and its floor are measured at the same moments.
  std::unique_ptr<bench::MembwProbe> probe;
  if (a.probe_bandwidth) {
    probe = std::make_unique<bench::MembwProbe>(e.decode_weight_bytes(),
                                                pool ? pool.get() : &ThreadPool::Default());
  }
  std::vector<double> probe_gbps;
  int64_t probe_ns = 0;

  const bool dump = !a.dump_logits.empty();
  std::vector<float> logits, dumped;
  std::vector<int32_t> dumped_tokens(ids.begin(), ids.end());
  Sampler sampler({a.greedy, a.temperature, a.top_p, a.seed});
  std::string text;
  const int64_t t0 = NowNs();
  if (Status s = e.Forward(ids.data(), n_prompt, 0, dump, &logits); !s.ok()) return abort_all(s);
  const int64_t prefill_allreduce_ns = e.allreduce_ns();  // decode's share is what comes after
  int64_t t_first = 0, generated = 0;
  int64_t steps = 0;  // decode forwards timed after the first token (decode_tokens_per_s counts them)
  int64_t pos = n_prompt;
  while (true) {
    int32_t next = -1;
    if (rank == 0) {
      if (dump) dumped.insert(dumped.end(), logits.begin(), logits.end());
      const float* last = logits.data() + logits.size() - static_cast<size_t>(vocab);
      next = sampler.Sample(last, vocab);
      if (generated == 0) t_first = NowNs();
      const bool stop = next == tok->eos_id() || generated >= a.max_tokens;
      if (!stop) {
        const std::string piece = tok->DecodePiece(next);
        text += piece;
        if (!a.json) {
          std::fputs(piece.c_str(), stdout);
          std::fflush(stdout);
        }
      } else {
        next = -1;
      }
    }
    if (Status s = comm.Broadcast(&next, sizeof(next), 0); !s.ok()) return abort_all(s);
    if (next < 0) break;
    ++generated;
    dumped_tokens.push_back(next);
    // The last token's forward would only feed a sample that is thrown away; --dump-logits
    // still wants its logits (every position of the sequence). Every rank knows --max-tokens.
    if (generated >= a.max_tokens && !dump) break;
    if (Status s = e.Forward(&next, 1, pos++, false, &logits); !s.ok()) return abort_all(s);
    ++steps;
    if (probe) {
      const int64_t p0 = NowNs();
      if (Status s = comm.Barrier(); !s.ok()) return abort_all(s);
      probe_gbps.push_back(probe->PassGbps());
      // And leave together: passes end up to a few ms apart (each rank's bandwidth differs), and
      // without this a rank that finished first would wait out the other's pass in the next
      // token's first allreduce, inside its decode time.
      if (Status s = comm.Barrier(); !s.ok()) return abort_all(s);
      probe_ns += NowNs() - p0;
    }
  }
  const int64_t t_end = NowNs();
  // Two summaries of the passes. The median pass is the bandwidth of a typical moment; the
  // time-weighted one (all bytes read / all pass time) is what a floor must use when bandwidth
  // moves within the run, because decode time adds up the same way: a token in a slow moment
  // costs decode, and the pass after it, more time, and a median would leave that out.
  double probe_median = 0, probe_time_weighted = 0;
  if (!probe_gbps.empty()) {
    // Equal bytes per pass: all bytes / all pass time is the harmonic mean of the passes.
    double inv_sum = 0;
    for (double g : probe_gbps) inv_sum += 1.0 / g;
    probe_time_weighted = static_cast<double>(probe_gbps.size()) / inv_sum;
    std::sort(probe_gbps.begin(), probe_gbps.end());
    probe_median = probe_gbps[probe_gbps.size() / 2];
  }

  // Per-rank figures to rank 0.
  constexpr int kFig = 8;
  int64_t mine[kFig] = {PeakRssBytes(), e.weight_wait_ns(),
                        static_cast<int64_t>(e.decode_weight_bytes()),
                        e.allreduce_ns() - prefill_allreduce_ns,
                        static_cast<int64_t>(e.memory_budget_bytes()),
                        static_cast<int64_t>(probe_median * 1e6),  // kB/s
                        static_cast<int64_t>(e.weights_huge_mapped_fraction() * 1e6),
                        static_cast<int64_t>(probe_time_weighted * 1e6)};
  std::vector<int64_t> all(kFig * static_cast<size_t>(comm.size()));
  if (Status s = comm.Allgather(mine, all.data(), sizeof(mine)); !s.ok()) return abort_all(s);
  if (rank != 0) return 0;
  const double ttft_ms = static_cast<double>(t_first - t0) / 1e6;
  const double prefill_tps = static_cast<double>(n_prompt) / (ttft_ms / 1e3);
  const double decode_s = static_cast<double>(t_end - t_first - probe_ns) / 1e9;
  const double decode_tps = steps > 0 ? static_cast<double>(steps) / decode_s : 0;
  nlohmann::json j = {{"text", text}, {"prompt_tokens", n_prompt}, {"tokens", generated},
                      {"ttft_ms", ttft_ms}, {"prefill_tokens_per_s", prefill_tps},
                      {"decode_tokens_per_s", decode_tps}, {"decode_steps", steps},
                      {"ranks", comm.size()}, {"context", e.max_seq()},
                      {"window", a.window}, {"window_mode", memory::WindowModeName(e.window_mode())},
                      {"allreduce", a.allreduce}, {"transport", a.transport},
                      {"peak_rss_bytes", nlohmann::json::array()},
                      {"weight_wait_ms", nlohmann::json::array()},
                      {"weight_bytes_per_token", nlohmann::json::array()},
                      {"allreduce_ms_per_token", nlohmann::json::array()},
                      {"memory_budget_bytes", nlohmann::json::array()}};
  for (int r = 0; r < comm.size(); ++r) {
    j["peak_rss_bytes"].push_back(all[kFig * r]);
    j["weight_wait_ms"].push_back(static_cast<double>(all[kFig * r + 1]) / 1e6);
    j["weight_bytes_per_token"].push_back(all[kFig * r + 2]);
    // Over the decode steps (the ones decode_tokens_per_s counts), per step.
    j["allreduce_ms_per_token"].push_back(
        steps > 0 ? static_cast<double>(all[kFig * r + 3]) / 1e6 / static_cast<double>(steps) : 0.0);
    j["memory_budget_bytes"].push_back(all[kFig * r + 4]);
    if (probe) {
      j["probe_gbps"].push_back(static_cast<double>(all[kFig * r + 5]) / 1e6);
      j["probe_gbps_time_weighted"].push_back(static_cast<double>(all[kFig * r + 7]) / 1e6);
    }
    if (e.window_mode() == memory::WindowMode::kResident) {
      j["huge_mapped_fraction"].push_back(static_cast<double>(all[kFig * r + 6]) / 1e6);
    }
  }
  if (probe) j["probe_passes"] = static_cast<int64_t>(probe_gbps.size());
  if (dump) {
    std::string err;
    const std::string bytes(reinterpret_cast<const char*>(dumped.data()), dumped.size() * 4);
    nlohmann::json side = {{"dtype", "f32"},
                           {"shape", {dumped.size() / static_cast<size_t>(vocab), vocab}},
                           {"tokens", dumped_tokens},
                           {"note", "row i holds the logits after the token at position i"}};
    if (!WriteFileAtomically(a.dump_logits, bytes, &err) ||
        !WriteFileAtomically(a.dump_logits + ".json", side.dump(1) + "\n", &err)) {
      std::fprintf(stderr, "strata infer: cannot write logits: %s\n", err.c_str());
      return 1;
    }
  }
  if (a.json) {
    // A model may emit byte pieces that are not valid UTF-8 on their own: replace, don't throw.
    std::printf("%s\n", j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  } else {
    std::printf("\n");
    std::fprintf(stderr,
                 "ttft %.1f ms, prefill %.1f tokens/s, decode %.2f tokens/s (%lld tokens), "
                 "%d rank(s), window %d (%s)\n",
                 ttft_ms, prefill_tps, decode_tps, static_cast<long long>(generated), comm.size(),
                 a.window, memory::WindowModeName(e.window_mode()));
    for (int r = 0; r < comm.size(); ++r) {
      std::fprintf(stderr, "  rank %d: peak RSS %.1f MiB, waited %.1f ms for weights\n", r,
                   static_cast<double>(all[kFig * r]) / (1 << 20),
                   static_cast<double>(all[kFig * r + 1]) / 1e6);
      if (probe) {
        std::fprintf(stderr,
                     "  rank %d: streaming read %.1f GB/s between tokens (median of %zu passes; "
                     "%.1f GB/s all bytes over all pass time)\n",
                     r, static_cast<double>(all[kFig * r + 5]) / 1e6, probe_gbps.size(),
                     static_cast<double>(all[kFig * r + 7]) / 1e6);
      }
    }
  }
  return 0;
}

}  // namespace

void AddInferCommand(CLI::App& root, std::vector<Command>& commands) {
  auto a = std::make_shared<InferArgs>();
  CLI::App* app = root.add_subcommand(
      "infer",
      "Tensor-parallel generation: launch one rank per shard of a folder written by "
      "`strata shard`, e.g.\n"
      "  mpirun -np 2 strata infer --shards ./tl2 --prompt \"Once upon a time\" --max-tokens 64\n"
      "Rank 0 tokenizes, samples and prints; every rank computes its heads and FFN columns with "
      "weights streamed through a window of --window blocks; two allreduces join each layer.");
  app->add_option("--shards", a->shards, "Folder written by strata shard")->required();
  app->add_option("--prompt", a->prompt, "Prompt text")->required();
  app->add_option("--max-tokens", a->max_tokens, "Tokens to generate")->capture_default_str();
  app->add_option("--context", a->context,
                  "KV cache length in tokens, prompt + generated (each rank keeps K and V in f32 "
                  "for its KV heads, allocated up front); 0 = the model's "
                  "max_position_embeddings, at most 2048")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  app->add_option("--temperature", a->temperature, "Sampling temperature")->capture_default_str();
  app->add_option("--top-p", a->top_p, "Nucleus sampling mass")->capture_default_str();
  app->add_option("--seed", a->seed, "Sampling seed")->capture_default_str();
  app->add_flag("--greedy", a->greedy, "Always take the most likely token");
  app->add_option("--window", a->window,
                  "Blocks (half layers) of weights in memory at once; 0 = all resident")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  app->add_option("--window-mode", a->window_mode,
                  "auto (map if the shard is in page cache, else copy), copy (pread into slots), "
                  "map (zero-copy mmap + madvise)")
      ->capture_default_str();
  app->add_flag("--direct-io", a->direct_io, "Read blocks with O_DIRECT (bypass the page cache)");
  app->add_option("--allreduce", a->allreduce, "star, ring, tree, native or auto")
      ->capture_default_str();
  app->add_option("--transport", a->transport, "mpi or tcp")->capture_default_str();
  app->add_flag("--json", a->json, "Print one JSON object (text, tokens, ttft_ms, "
                                   "decode_tokens_per_s over decode_steps forwards (the "
                                   "first token comes from the prefill), and per rank "
                                   "peak_rss_bytes, "
                                   "weight_wait_ms, weight_bytes_per_token, "
                                   "allreduce_ms_per_token, memory_budget_bytes = W largest "
                                   "blocks + resident tensors + KV cache; with --window 0 "
                                   "huge_mapped_fraction, the share of the weights mapped in "
                                   "2 MiB pages, which decode speed depends on)");
  app->add_option("--dump-logits", a->dump_logits,
                  "Write the logits of every position (raw f32) and FILE.json (shape, tokens)");
  app->add_flag("--probe-bandwidth", a->probe_bandwidth,
                "Benchmark aid: after every decode step all ranks stream-read a buffer of their "
                "weight bytes per token (strata bench membw's probe), outside the decode timing; "
                "--json gains per rank probe_gbps (median pass) and probe_gbps_time_weighted "
                "(all bytes over all pass time: the bandwidth for the decode floor at the same "
                "moments). Its buffer counts in peak RSS");
  commands.push_back({app, [a]() { return RunInfer(*a); }});
}

}  // namespace strata::launcher
