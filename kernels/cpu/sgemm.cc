#include "kernels/cpu/sgemm.h"

#include <oneapi/dnnl/dnnl.h>
#include <omp.h>

#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <tuple>

#include <fmt/format.h>

#include "base/aligned_buffer.h"
#include "base/check.h"

namespace strata::kernels::cpu {
namespace {

// oneDNN's OpenMP runtime (Debian builds it with DNNL_CPU_THREADING_RUNTIME OMP, libgomp) sizes
// its team from the calling thread's ICV: one thread here, so each pool thread runs its slice
// alone (set once per thread; libgomp keeps ICVs per thread). Sgemm and the matmul primitive
// both read it.
void OneOmpThreadPerCaller() {
  thread_local const bool once = [] {
    omp_set_num_threads(1);
    return true;
  }();
  (void)once;
}

// Both GEMMs' prologue: true when no product is needed (an empty C; k == 0, where a product over
// nothing only scales C: done here, keeping the semantics explicit); else holds oneDNN to the
// calling thread and returns false.
bool DoneWithoutProduct(int64_t m, int64_t n, int64_t k, float beta, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return true;
  if (k <= 0) {
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
      }
    }
    return true;
  }
  OneOmpThreadPerCaller();
  return false;
}

// ---- the bf16 matmul primitives --------------------------------------------------------------

const char* IsaName(dnnl_cpu_isa_t isa) {
  switch (isa) {
    case dnnl_cpu_isa_sse41: return "sse41";
    case dnnl_cpu_isa_avx: return "avx";
    case dnnl_cpu_isa_avx2: return "avx2";
    case dnnl_cpu_isa_avx512_mic: return "avx512_mic";
    case dnnl_cpu_isa_avx512_mic_4ops: return "avx512_mic_4ops";
    case dnnl_cpu_isa_avx512_core: return "avx512_core";
    case dnnl_cpu_isa_avx512_core_vnni: return "avx512_core_vnni";
    case dnnl_cpu_isa_avx512_core_bf16: return "avx512_core_bf16";
    case dnnl_cpu_isa_avx512_core_amx: return "avx512_core_amx";
    case dnnl_cpu_isa_avx2_vnni: return "avx2_vnni";
    default: return "other";
  }
}

dnnl_engine_t Engine() {
  static dnnl_engine_t engine = [] {
    dnnl_engine_t e = nullptr;
    const dnnl_status_t st = dnnl_engine_create(&e, dnnl_cpu, 0);
    STRATA_CHECK_MSG(st == dnnl_success, "dnnl_engine_create(cpu) failed with status {}",
                     static_cast<int>(st));
    return e;
  }();
  return engine;
}

// One stream per calling thread: oneDNN streams are not meant to be shared between threads.
dnnl_stream_t ThreadStream() {
  struct Stream {
    dnnl_stream_t s = nullptr;
    Stream() {
      const dnnl_status_t st = dnnl_stream_create(&s, Engine(), dnnl_stream_default_flags);
      STRATA_CHECK_MSG(st == dnnl_success, "dnnl_stream_create failed with status {}",
                       static_cast<int>(st));
    }
    ~Stream() { dnnl_stream_destroy(s); }
  };
  thread_local Stream stream;
  return stream.s;
}

struct MatmulKey {
  bool ta, tb;
  int64_t m, n, k, lda, ldb, ldc;
  float alpha, beta;
  auto tie() const { return std::tie(ta, tb, m, n, k, lda, ldb, ldc, alpha, beta); }
  bool operator<(const MatmulKey& o) const { return tie() < o.tie(); }
};

struct Matmul {
  dnnl_primitive_t prim = nullptr;
  dnnl_memory_desc_t a, b, c, scratch;
  size_t scratch_bytes = 0;
  std::string impl;
  Matmul() = default;
  Matmul(const Matmul&) = delete;
  Matmul& operator=(const Matmul&) = delete;
  ~Matmul() {
    if (prim != nullptr) dnnl_primitive_destroy(prim);
  }
};

// Creates the primitive for `key`: src = op(A) [m, k] bf16, weights = op(B) [k, n] bf16, dst =
// C [m, n] f32, transposes expressed as strides; alpha as an output scale, beta as a sum
// post-op; the scratchpad is the caller's (user mode), so one primitive serves every thread.
StatusOr<std::unique_ptr<Matmul>> CreateMatmul(const MatmulKey& key) {
  auto mm = std::make_unique<Matmul>();
  const dnnl_dims_t a_dims = {key.m, key.k}, b_dims = {key.k, key.n}, c_dims = {key.m, key.n};
  const dnnl_dims_t a_str = {key.ta ? 1 : key.lda, key.ta ? key.lda : 1};
  const dnnl_dims_t b_str = {key.tb ? 1 : key.ldb, key.tb ? key.ldb : 1};
  const dnnl_dims_t c_str = {key.ldc, 1};
  auto fail = [&](const char* what, dnnl_status_t st) {
    return Status::FailedPrecondition(fmt::format(
        "oneDNN {} for a bf16 matmul ({}x{}x{}, trans {}{}) failed with status {} (oneDNN "
        "dispatches to {})",
        what, key.m, key.n, key.k, key.ta ? 'T' : 'N', key.tb ? 'T' : 'N', static_cast<int>(st),
        IsaName(dnnl_get_effective_cpu_isa())));
  };
  dnnl_status_t st;
  if ((st = dnnl_memory_desc_init_by_strides(&mm->a, 2, a_dims, dnnl_bf16, a_str)) != dnnl_success ||
      (st = dnnl_memory_desc_init_by_strides(&mm->b, 2, b_dims, dnnl_bf16, b_str)) != dnnl_success ||
      (st = dnnl_memory_desc_init_by_strides(&mm->c, 2, c_dims, dnnl_f32, c_str)) != dnnl_success) {
    return fail("memory descriptor", st);
  }
  dnnl_matmul_desc_t desc;
  if ((st = dnnl_matmul_desc_init(&desc, &mm->a, &mm->b, nullptr, &mm->c)) != dnnl_success) {
    return fail("matmul descriptor", st);
  }
  dnnl_primitive_attr_t attr = nullptr;
  if ((st = dnnl_primitive_attr_create(&attr)) != dnnl_success) return fail("attribute", st);
  std::unique_ptr<dnnl_primitive_attr, decltype(&dnnl_primitive_attr_destroy)> attr_guard(
      attr, dnnl_primitive_attr_destroy);
  if ((st = dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user)) !=
      dnnl_success) {
    return fail("scratchpad mode", st);
  }
  if (key.alpha != 1.0f &&
      (st = dnnl_primitive_attr_set_output_scales(attr, 1, 0, &key.alpha)) != dnnl_success) {
    return fail("output scale", st);
  }
  if (key.beta != 0.0f) {
    dnnl_post_ops_t po = nullptr;
    if ((st = dnnl_post_ops_create(&po)) != dnnl_success) return fail("post-ops", st);
    st = dnnl_post_ops_append_sum(po, key.beta);
    if (st == dnnl_success) st = dnnl_primitive_attr_set_post_ops(attr, po);
    dnnl_post_ops_destroy(po);
    if (st != dnnl_success) return fail("sum post-op", st);
  }
  dnnl_primitive_desc_t pd = nullptr;
  if ((st = dnnl_primitive_desc_create(&pd, &desc, attr, Engine(), nullptr)) != dnnl_success) {
    return fail("primitive descriptor", st);
  }
  std::unique_ptr<dnnl_primitive_desc, decltype(&dnnl_primitive_desc_destroy)> pd_guard(
      pd, dnnl_primitive_desc_destroy);
  const char* impl = nullptr;
  if (dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &impl) == dnnl_success && impl) {
    mm->impl = impl;
  }
  const dnnl_memory_desc_t* scratch = dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0);
  if (scratch == nullptr) return fail("scratchpad query", dnnl_runtime_error);
  mm->scratch = *scratch;
  mm->scratch_bytes = dnnl_memory_desc_get_size(scratch);
  if ((st = dnnl_primitive_create(&mm->prim, pd)) != dnnl_success) return fail("primitive", st);
  return mm;
}

// Primitives live for the process (never destroyed: oneDNN's own statics may be gone at exit).
class MatmulCache {
 public:
  StatusOr<const Matmul*> Get(const MatmulKey& key) {
    {
      std::shared_lock<std::shared_mutex> lock(mu_);
      auto it = map_.find(key);
      if (it != map_.end()) return it->second.get();
    }
    // Created outside the lock (JIT compilation takes milliseconds); a thread that lost the race
    // drops its copy.
    STRATA_ASSIGN_OR_RETURN(std::unique_ptr<Matmul> mm, CreateMatmul(key));
    std::unique_lock<std::shared_mutex> lock(mu_);
    return map_.try_emplace(key, std::move(mm)).first->second.get();
  }

 private:
  std::shared_mutex mu_;
  std::map<MatmulKey, std::unique_ptr<Matmul>> map_;
};

MatmulCache& Cache() {
  static MatmulCache* cache = new MatmulCache();
  return *cache;
}

// A dnnl_memory_t over a caller's buffer, destroyed at scope end.
struct Mem {
  dnnl_memory_t m = nullptr;
  Mem(const dnnl_memory_desc_t* md, const void* handle) {
    const dnnl_status_t st = dnnl_memory_create(&m, md, Engine(), const_cast<void*>(handle));
    STRATA_CHECK_MSG(st == dnnl_success, "dnnl_memory_create failed with status {}",
                     static_cast<int>(st));
  }
  ~Mem() { dnnl_memory_destroy(m); }
  Mem(const Mem&) = delete;
  Mem& operator=(const Mem&) = delete;
};

}  // namespace

void Sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
           const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
           int64_t ldc) {
  if (DoneWithoutProduct(m, n, k, beta, c, ldc)) return;
  const dnnl_status_t st = dnnl_sgemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', m, n, k, alpha, a,
                                      lda, b, ldb, beta, c, ldc);
  // Only bad arguments make dnnl_sgemm fail: a programming error in the callers.
  STRATA_CHECK_MSG(st == dnnl_success, "dnnl_sgemm({}, {}, {}, {}, {}) failed with status {}",
                   trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', m, n, k, static_cast<int>(st));
}

void GemmBF16(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
              const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, float beta, float* c,
              int64_t ldc) {
  if (DoneWithoutProduct(m, n, k, beta, c, ldc)) return;
  StatusOr<const Matmul*> mm =
      Cache().Get({trans_a, trans_b, m, n, k, lda, ldb, ldc, alpha, beta});
  STRATA_CHECK_MSG(mm.ok(), "{} (GemmBF16 called where GemmBF16Support fails)",
                   mm.status().ToString());
  const Matmul& p = **mm;
  // Per-thread scratchpad, grown to the largest primitive this thread has run.
  thread_local AlignedBuffer scratch;
  if (scratch.size() < p.scratch_bytes) scratch = AlignedBuffer(p.scratch_bytes);
  Mem ma(&p.a, a), mb(&p.b, b), mc(&p.c, c), ms(&p.scratch, scratch.data());
  const dnnl_exec_arg_t args[4] = {{DNNL_ARG_SRC, ma.m},
                                   {DNNL_ARG_WEIGHTS, mb.m},
                                   {DNNL_ARG_DST, mc.m},
                                   {DNNL_ARG_SCRATCHPAD, ms.m}};
  const dnnl_status_t st = dnnl_primitive_execute(p.prim, ThreadStream(), 4, args);
  STRATA_CHECK_MSG(st == dnnl_success, "bf16 matmul {}x{}x{} failed with status {}", m, n, k,
                   static_cast<int>(st));
}

Status GemmBF16Support(std::string* impl, bool* native) {
  const bool has_bf16 = __builtin_cpu_supports("avx512bf16");
  // Native: the CPU has the instructions and oneDNN may use them (DNNL_MAX_CPU_ISA can cap it).
  const int isa = static_cast<int>(dnnl_get_effective_cpu_isa());
  const int bf16_isa = static_cast<int>(dnnl_cpu_isa_avx512_core_bf16);
  if (native != nullptr) *native = has_bf16 && (isa & bf16_isa) == bf16_isa;
  StatusOr<const Matmul*> mm = Cache().Get({false, true, 64, 64, 64, 64, 64, 64, 1.0f, 0.0f});
  if (!mm.ok()) {
    return Status::FailedPrecondition(fmt::format(
        "bf16 matrix products are not available: this CPU {} AVX512-BF16 and oneDNN (which "
        "dispatches to {} here) cannot run a bf16 matmul: {}",
        has_bf16 ? "has" : "lacks", IsaName(dnnl_get_effective_cpu_isa()),
        mm.status().message()));
  }
  if (impl != nullptr) *impl = (*mm)->impl;
  return Status::OK();
}

}  // namespace strata::kernels::cpu
