// `strata shard`: turn a Hugging Face Llama folder into one shard file per tensor-parallel rank.
#include <unistd.h>

#include <cstdio>
#include <string>

#include <nlohmann/json.hpp>

#include "base/clock.h"
#include "launcher/commands.h"
#include "parallel/tp_plan.h"
#include "runtime/hf_model.h"
#include "runtime/shard_file.h"

namespace strata::launcher {
namespace {

struct ShardArgs {
  std::string model;
  int ranks = 1;
  std::string out;
  std::string dtype = "f32";
  std::string ratios;
  bool json = false;
};

// One line redrawn in place on a terminal, plain lines (every 10%) otherwise.
class ProgressBar {
 public:
  explicit ProgressBar(const char* what) : what_(what), tty_(::isatty(2) != 0) {}
  void Update(int64_t done, int64_t total) {
    const int pct = total > 0 ? static_cast<int>(100 * done / total) : 100;
    if (tty_) {
      const int filled = pct * 30 / 100;
      std::fprintf(stderr, "\r%s [%.*s%*s] %3d%% (%lld/%lld)", what_, filled,
                   "##############################", 30 - filled, "", pct,
                   static_cast<long long>(done), static_cast<long long>(total));
      if (done == total) std::fputc('\n', stderr);
    } else if (pct / 10 != last_ / 10 || done == total) {
      std::fprintf(stderr, "%s %d%% (%lld/%lld)\n", what_, pct, static_cast<long long>(done),
                   static_cast<long long>(total));
    }
    last_ = pct;
  }

 private:
  const char* what_;
  bool tty_;
  int last_ = -1;
};

int RunShard(const ShardArgs& a) {
  auto fail = [](const Status& st) {
    std::fprintf(stderr, "strata shard: %s\n", st.ToString().c_str());
    return 1;
  };
  if (a.dtype != "f32" && a.dtype != "bf16" && a.dtype != "q8_0") {
    return fail(Status::InvalidArgument("--dtype must be f32, bf16 or q8_0, not '" + a.dtype + "'"));
  }
  std::vector<double> ratios;
  if (!a.ratios.empty()) {
    StatusOr<std::vector<double>> r = parallel::ParseRatios(a.ratios);
    if (!r.ok()) return fail(r.status());
    ratios = *r;
  }
  StatusOr<std::unique_ptr<runtime::HfModel>> model = runtime::HfModel::Open(a.model);
  if (!model.ok()) return fail(model.status());
  const runtime::LlamaConfig& c = (*model)->config();
  parallel::PlanShape shape{c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, 32,
                            c.vocab_size};
  StatusOr<parallel::TpPlan> plan = parallel::MakeTpPlan(shape, a.ranks, ratios);
  if (!plan.ok()) return fail(plan.status());
  std::fprintf(stderr, "strata shard: %s -> %s, %d rank(s), %s weights\n%s", a.model.c_str(),
               a.out.c_str(), a.ranks, a.dtype.c_str(), plan->ToString().c_str());
  std::vector<proto::RankSlice> slices = parallel::ToProtoSlices(*plan);
  ProgressBar bar("writing tensors");
  runtime::ShardWriteOptions opts;
  opts.weight_dtype = a.dtype;
  opts.progress = [&bar](int64_t done, int64_t total) { bar.Update(done, total); };
  const int64_t t0 = NowNs();
  Status st = runtime::WriteShardFolder(**model, slices, plan->ratios, a.out, opts);
  if (!st.ok()) return fail(st);
  const double secs = static_cast<double>(NowNs() - t0) / 1e9;
  uint64_t total_bytes = 0;
  nlohmann::json files = nlohmann::json::array();
  for (int r = 0; r < a.ranks; ++r) {
    StatusOr<std::unique_ptr<runtime::ShardFile>> f =
        runtime::ShardFile::Open(runtime::ShardPath(a.out, r));
    if (!f.ok()) return fail(f.status());
    total_bytes += (*f)->file_size();
    files.push_back({{"rank", r}, {"path", (*f)->path()}, {"bytes", (*f)->file_size()},
                     {"blocks", (*f)->manifest().blocks_size()}});
  }
  std::fprintf(stderr, "strata shard: wrote %d file(s), %.1f MiB, in %.1f s\n", a.ranks,
               static_cast<double>(total_bytes) / (1 << 20), secs);
  if (a.json) {
    nlohmann::json j = {{"out", a.out}, {"ranks", a.ranks}, {"dtype", a.dtype},
                        {"seconds", secs}, {"files", files},
                        {"fingerprint", (*model)->fingerprint()}};
    std::printf("%s\n", j.dump().c_str());
  }
  return 0;
}

}  // namespace

void AddShardCommand(CLI::App& root, std::vector<Command>& commands) {
  auto a = std::make_shared<ShardArgs>();
  CLI::App* app = root.add_subcommand(
      "shard",
      "Split a Hugging Face Llama-family model (config.json, model.safetensors or sharded "
      "safetensors with model.safetensors.index.json, tokenizer.model) into one shard file per "
      "tensor-parallel rank. Attention is split by KV-head groups, the FFN by intermediate "
      "columns; any rank count up to the number of KV heads works. The output folder appears "
      "only when complete.\n"
      "Example: strata shard --model ./TinyLlama --ranks 3 --ratios 2,1,1 --dtype q8_0 --out ./tl3");
  app->add_option("--model", a->model, "Hugging Face model folder")->required();
  app->add_option("--ranks", a->ranks, "Number of tensor-parallel ranks")
      ->required()
      ->check(CLI::PositiveNumber);
  app->add_option("--out", a->out, "Output folder (must not exist)")->required();
  app->add_option("--dtype", a->dtype, "Weight storage: f32, bf16 or q8_0 (int8, one scale per 32)")
      ->capture_default_str();
  app->add_option("--ratios", a->ratios,
                  "Relative share of each rank for unequal machines, e.g. 2,1,1 (default equal)");
  app->add_flag("--json", a->json, "Print a JSON summary on stdout");
  commands.push_back({app, [a]() { return RunShard(*a); }});
}

}  // namespace strata::launcher
