// One decode token per row under per-row LoRA mixtures, read straight from the stacked library.
//
// y[b] += sum over the row's pairs p, in slot order: coeff[p] * Bt[u_p]^T (A[u_p] x[b])
//
// The pairs (row, adapter, coefficient) come sorted by adapter, so each adapter of the batch's union is read from
// memory once per call whichever rows use it, and no per-row copy of any factor is made. Phase 1 (threads over
// adapters) writes each pair's contribution to its own slot of `part`: the pairs of one adapter are taken two at a
// time, so each value of A and B is loaded and widened once for both; the adapter's B and the next adapter's A are
// prefetched while A is read. Phase 2 (threads over rows) adds a row's contributions in slot order. Each pair's
// sums run over fixed lanes in a fixed order whichever pairs it is taken with, so a row's result does not depend on
// the other rows, on the batch's union or on the number of threads. logo/library_decode.py builds the pair index,
// checks the arguments and holds the fp32 reference this kernel is tested against.
//
// The factors may be stored compact (bf16 or fp16, see logo/library.py): each value is widened to fp32 as it is
// read, which is exact, so a compact library gives the very bits an fp32 one gives while half the bytes cross the
// memory bus. Where the compiler targets AVX-512 the inner loops are written with its intrinsics (one register is
// one lane block); elsewhere they are plain loops the compiler vectorises. Both compute the same fused
// multiply-adds in the same order: every multiply-add is written as one (intrinsic or std::fma), and the build turns
// off the compiler's own contraction (-ffp-contract=off), so no instantiation is left to fuse differently (with
// contraction left to the compiler, the fp32 and compact instantiations' scalar tails were fused differently on one
// CPU and differed by a rounding).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kLanes = 16;  // floats per lane block (one AVX-512 register)
constexpr int64_t kRanks = 8;   // rows of A in flight: their independent sums hide the multiply-add latency
constexpr int64_t kWidth = 8 * kLanes;  // output columns in flight in expand, for the same reason
constexpr int64_t kPairs = 2;   // pairs of one adapter taken together

// Stored factor values widened to fp32 (exact for every type here).
inline float widen(float v) { return v; }
inline float widen(at::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;  // bf16 is the top half of an fp32
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}
inline float widen(at::Half v) { return static_cast<float>(v); }

#if defined(__AVX512F__)
// kLanes stored values widened to fp32 in one register.
inline __m512 load_lanes(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_lanes(const at::BFloat16* p) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
inline __m512 load_lanes(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif

// Ask for `bytes` at `p` to be brought into cache ahead of use.
inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
}

// The sum of kLanes partial sums, halving in a fixed order.
inline float reduce(float* lane) {
  for (int64_t w = kLanes / 2; w >= 1; w /= 2) {
    for (int64_t l = 0; l < w; ++l) lane[l] += lane[l + w];
  }
  return lane[0];
}

// low[p][q] = c[p] * dot(a[q], x[p]) for the `count` rows of A at `a` (row stride d) and the P pairs' inputs,
// streamed side by side, each into kLanes fixed partial sums: `count * P` independent sums hide the multiply-add
// latency, and each value of A is loaded once for the P pairs.
template <int64_t count, int64_t P, typename T>
inline void project(const T* a, const float* const* x, int64_t d, const float* c, float* const* low) {
  float lane[P][count][kLanes] = {};
  const int64_t full = d - d % kLanes;
#if defined(__AVX512F__)
  __m512 acc[P][count];
  for (int64_t p = 0; p < P; ++p)
    for (int64_t q = 0; q < count; ++q) acc[p][q] = _mm512_setzero_ps();
  for (int64_t i = 0; i < full; i += kLanes) {
    __m512 xv[P];
    for (int64_t p = 0; p < P; ++p) xv[p] = _mm512_loadu_ps(x[p] + i);
    for (int64_t q = 0; q < count; ++q) {
      const __m512 av = load_lanes(a + q * d + i);
      for (int64_t p = 0; p < P; ++p) acc[p][q] = _mm512_fmadd_ps(av, xv[p], acc[p][q]);
    }
  }
  for (int64_t p = 0; p < P; ++p)
    for (int64_t q = 0; q < count; ++q) _mm512_storeu_ps(lane[p][q], acc[p][q]);
#else
  for (int64_t i = 0; i < full; i += kLanes) {
#pragma GCC unroll 8
    for (int64_t q = 0; q < count; ++q) {
      const T* row = a + q * d + i;
      for (int64_t p = 0; p < P; ++p) {
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) lane[p][q][l] = std::fma(widen(row[l]), x[p][i + l], lane[p][q][l]);
      }
    }
  }
#endif
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t q = 0; q < count; ++q) {
      float s = reduce(lane[p][q]);
      for (int64_t i = full; i < d; ++i) s = std::fma(widen(a[q * d + i]), x[p][i], s);
      low[p][q] = c[p] * s;
    }
  }
}

template <int64_t P, typename T>
inline void project_all(const T* a, const float* const* x, int64_t r, int64_t d, const float* c, float* const* low) {
  float* at[P];
  for (int64_t t = 0; t < r;) {
    for (int64_t p = 0; p < P; ++p) at[p] = low[p] + t;
    if (t + kRanks <= r) {
      project<kRanks, P>(a + t * d, x, d, c, at);
      t += kRanks;
    } else {
      project<1, P>(a + t * d, x, d, c, at);
      t += 1;
    }
  }
}

// out[p][j] = sum_t low[p][t] * bt[t, j] for j < d (row stride d), `width` columns at a time held in registers,
// each value of B loaded once for the P pairs.
template <int64_t width, int64_t P, typename T>
inline int64_t expand_block(const float* const* low, const T* bt, int64_t r, int64_t d, int64_t j0,
                            float* const* out) {
  for (; j0 + width <= d; j0 += width) {
#if defined(__AVX512F__)
    constexpr int64_t m = width / kLanes;
    __m512 acc[P][m];
    for (int64_t p = 0; p < P; ++p)
      for (int64_t v = 0; v < m; ++v) acc[p][v] = _mm512_setzero_ps();
    for (int64_t t = 0; t < r; ++t) {
      __m512 s[P];
      for (int64_t p = 0; p < P; ++p) s[p] = _mm512_set1_ps(low[p][t]);
      const T* row = bt + t * d + j0;
      for (int64_t v = 0; v < m; ++v) {
        const __m512 bv = load_lanes(row + v * kLanes);
        for (int64_t p = 0; p < P; ++p) acc[p][v] = _mm512_fmadd_ps(s[p], bv, acc[p][v]);
      }
    }
    for (int64_t p = 0; p < P; ++p)
      for (int64_t v = 0; v < m; ++v) _mm512_storeu_ps(out[p] + j0 + v * kLanes, acc[p][v]);
#else
    float acc[P][width] = {};
    for (int64_t t = 0; t < r; ++t) {
      const T* row = bt + t * d + j0;
      for (int64_t p = 0; p < P; ++p) {
        const float s = low[p][t];
#pragma omp simd
        for (int64_t l = 0; l < width; ++l) acc[p][l] = std::fma(s, widen(row[l]), acc[p][l]);
      }
    }
    for (int64_t p = 0; p < P; ++p)
      for (int64_t l = 0; l < width; ++l) out[p][j0 + l] = acc[p][l];
#endif
  }
  return j0;
}

template <int64_t P, typename T>
inline void expand(const float* const* low, const T* bt, int64_t r, int64_t d, float* const* out) {
  int64_t j = expand_block<kWidth, P>(low, bt, r, d, 0, out);
  j = expand_block<kLanes, P>(low, bt, r, d, j, out);
  for (; j < d; ++j) {
    for (int64_t p = 0; p < P; ++p) {
      float s = 0.f;
      for (int64_t t = 0; t < r; ++t) s = std::fma(low[p][t], widen(bt[t * d + j]), s);
      out[p][j] = s;
    }
  }
}

// Pairs first .. first+P-1 (one adapter's: A at `a`, B^T at `bt`) into their slots of `part`.
template <int64_t P, typename T>
inline void pair_block(const T* a, const T* bt, int64_t first, int64_t r, int64_t d_in, int64_t d_out,
                       const float* xp, const int64_t* prow, const float* pcoeff, float* low, float* part) {
  const float* x[P];
  float* lows[P];
  float* out[P];
  for (int64_t p = 0; p < P; ++p) {
    x[p] = xp + prow[first + p] * d_in;
    lows[p] = low + p * r;
    out[p] = part + (first + p) * d_out;
  }
  project_all<P>(a, x, r, d_in, pcoeff + first, lows);
  expand<P>(lows, bt, r, d_out, out);
}

template <typename T>
void run(const float* xp, const T* ap, const T* bp, int64_t r, int64_t d_in, int64_t d_out, int64_t groups,
         int64_t rows, const int64_t* gptr, const int64_t* gadapter, const int64_t* prow, const float* pcoeff,
         const int64_t* rptr, const int64_t* rpair, float* part, float* yp) {
  const int64_t a_bytes = r * d_in * static_cast<int64_t>(sizeof(T));
  const int64_t b_bytes = r * d_out * static_cast<int64_t>(sizeof(T));
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    std::vector<float> low(kPairs * r);
    for (int64_t g = g0; g < g1; ++g) {
      const T* a = ap + gadapter[g] * r * d_in;
      const T* bt = bp + gadapter[g] * r * d_out;
      // B is read after A. It was asked for one adapter ahead too, but asking again here, once A has pushed it
      // towards the outer caches, measured faster (kernel alone, 60 modules at batch 16: 22.6 against 24.2 ms).
      prefetch(bt, b_bytes);
      if (g + 1 < g1) {
        prefetch(ap + gadapter[g + 1] * r * d_in, a_bytes);
        prefetch(bp + gadapter[g + 1] * r * d_out, b_bytes);
      }
      int64_t p = gptr[g];
      for (; p + kPairs <= gptr[g + 1]; p += kPairs)
        pair_block<kPairs>(a, bt, p, r, d_in, d_out, xp, prow, pcoeff, low.data(), part);
      for (; p < gptr[g + 1]; ++p) pair_block<1>(a, bt, p, r, d_in, d_out, xp, prow, pcoeff, low.data(), part);
    }
  });
  at::parallel_for(0, rows, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float* yb = yp + b * d_out;
      for (int64_t q = rptr[b]; q < rptr[b + 1]; ++q) {
        const float* src = part + rpair[q] * d_out;
#pragma omp simd
        for (int64_t j = 0; j < d_out; ++j) yb[j] += src[j];
      }
    }
  });
}

}  // namespace

void library_decode(const torch::Tensor& x, const torch::Tensor& A, const torch::Tensor& Bt,
                    const torch::Tensor& group_ptr, const torch::Tensor& group_adapter, const torch::Tensor& pair_row,
                    const torch::Tensor& pair_coeff, const torch::Tensor& row_ptr, const torch::Tensor& row_pair,
                    torch::Tensor& y) {
  const int64_t groups = group_adapter.size(0), pairs = pair_row.size(0), rows = y.size(0);
  const int64_t r = A.size(1), d_in = A.size(2), d_out = Bt.size(2);
  const float* xp = x.data_ptr<float>();
  const int64_t* gptr = group_ptr.data_ptr<int64_t>();
  const int64_t* gadapter = group_adapter.data_ptr<int64_t>();
  const int64_t* prow = pair_row.data_ptr<int64_t>();
  const float* pcoeff = pair_coeff.data_ptr<float>();
  const int64_t* rptr = row_ptr.data_ptr<int64_t>();
  const int64_t* rpair = row_pair.data_ptr<int64_t>();
  float* yp = y.data_ptr<float>();

  thread_local std::vector<float> part_buffer;  // [pairs, d_out], reused from call to call
  if (part_buffer.size() < static_cast<size_t>(pairs * d_out)) part_buffer.resize(pairs * d_out);
  float* part = part_buffer.data();

  TORCH_CHECK(A.scalar_type() == Bt.scalar_type(), "A and Bt must have one dtype");
  switch (A.scalar_type()) {
    case at::kFloat:
      run(xp, A.data_ptr<float>(), Bt.data_ptr<float>(), r, d_in, d_out, groups, rows, gptr, gadapter, prow, pcoeff,
          rptr, rpair, part, yp);
      break;
    case at::kBFloat16:
      run(xp, A.data_ptr<at::BFloat16>(), Bt.data_ptr<at::BFloat16>(), r, d_in, d_out, groups, rows, gptr, gadapter,
          prow, pcoeff, rptr, rpair, part, yp);
      break;
    case at::kHalf:
      run(xp, A.data_ptr<at::Half>(), Bt.data_ptr<at::Half>(), r, d_in, d_out, groups, rows, gptr, gadapter, prow,
          pcoeff, rptr, rpair, part, yp);
      break;
    default:
      TORCH_CHECK(false, "library_decode stores factors as fp32, bf16 or fp16, got ", A.scalar_type());
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("library_decode", &library_decode, "per-row LoRA mixtures, one decode token per row, from the stacked library");
}
