// One decode token per row under per-row LoRA mixtures, read straight from the stacked library.
//
// y[b] += sum over the row's pairs p, in slot order: coeff[p] * Bt[u_p]^T (A[u_p] x[b])
//
// The pairs (row, adapter, coefficient) come sorted by adapter, so each adapter of the batch's union is read from
// memory once per call whichever rows use it (rows that share it find it in cache), and no per-row copy of any
// factor is made. Phase 1 (threads over adapters) writes each pair's contribution to its own slot of `part`;
// phase 2 (threads over rows) adds a row's contributions in slot order. A row's result therefore does not depend
// on the other rows, on the batch's union or on the number of threads. logo/library_decode.py builds the pair
// index, checks the arguments and holds the fp32 reference this kernel is tested against.
//
// The factors may be stored compact (bf16 or fp16, see logo/library.py): each value is widened to fp32 as it is
// read, which is exact, and every sum runs in a fixed order of fixed lanes, so a compact library gives the very
// bits an fp32 one gives while half the bytes cross the memory bus.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;  // floats per vector block
constexpr int64_t kRanks = 8;   // rows of A in flight: their independent sums hide the multiply-add latency
constexpr int64_t kWidth = 8 * kLanes;  // output columns in flight in expand, for the same reason

// Stored factor values widened to fp32 (exact for every type here).
inline float widen(float v) { return v; }
inline float widen(at::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;  // bf16 is the top half of an fp32
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}
inline float widen(at::Half v) { return static_cast<float>(v); }

// The sum of kLanes partial sums, halving in a fixed order.
inline float reduce(float* lane) {
  for (int64_t w = kLanes / 2; w >= 1; w /= 2) {
    for (int64_t l = 0; l < w; ++l) lane[l] += lane[l + w];
  }
  return lane[0];
}

// low[q] = c * dot(a[q], x) for the `count` rows of A at `a` (row stride d), streamed side by side, each into kLanes
// fixed partial sums: `count` independent sums hide the multiply-add latency.
template <int64_t count, typename T>
inline void project(const T* a, const float* x, int64_t d, float c, float* low) {
  float lane[count][kLanes] = {};
  const int64_t full = d - d % kLanes;
  for (int64_t i = 0; i < full; i += kLanes) {
#pragma GCC unroll 8
    for (int64_t q = 0; q < count; ++q) {
      const T* row = a + q * d + i;
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) lane[q][l] += widen(row[l]) * x[i + l];
    }
  }
  for (int64_t q = 0; q < count; ++q) {
    float s = reduce(lane[q]);
    for (int64_t i = full; i < d; ++i) s += widen(a[q * d + i]) * x[i];
    low[q] = c * s;
  }
}

template <typename T>
inline void project_all(const T* a, const float* x, int64_t r, int64_t d, float c, float* low) {
  int64_t t = 0;
  for (; t + kRanks <= r; t += kRanks) project<kRanks>(a + t * d, x, d, c, low + t);
  for (; t < r; ++t) project<1>(a + t * d, x, d, c, low + t);
}

// out[j] = sum_t low[t] * bt[t, j] for j < d (row stride d), `width` columns at a time held in registers.
template <int64_t width, typename T>
inline int64_t expand_block(const float* low, const T* bt, int64_t r, int64_t d, int64_t j0, float* out) {
  for (; j0 + width <= d; j0 += width) {
    float acc[width] = {};
    for (int64_t t = 0; t < r; ++t) {
      const float s = low[t];
      const T* row = bt + t * d + j0;
#pragma omp simd
      for (int64_t l = 0; l < width; ++l) acc[l] += s * widen(row[l]);
    }
    for (int64_t l = 0; l < width; ++l) out[j0 + l] = acc[l];
  }
  return j0;
}

template <typename T>
inline void expand(const float* low, const T* bt, int64_t r, int64_t d, float* out) {
  int64_t j = expand_block<kWidth>(low, bt, r, d, 0, out);
  j = expand_block<kLanes>(low, bt, r, d, j, out);
  for (; j < d; ++j) {
    float s = 0.f;
    for (int64_t t = 0; t < r; ++t) s += low[t] * widen(bt[t * d + j]);
    out[j] = s;
  }
}

template <typename T>
void run(const float* xp, const T* ap, const T* bp, int64_t r, int64_t d_in, int64_t d_out, int64_t groups,
         int64_t rows, const int64_t* gptr, const int64_t* gadapter, const int64_t* prow, const float* pcoeff,
         const int64_t* rptr, const int64_t* rpair, float* part, float* yp) {
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    std::vector<float> low(r);
    for (int64_t g = g0; g < g1; ++g) {
      const T* a = ap + gadapter[g] * r * d_in;
      const T* bt = bp + gadapter[g] * r * d_out;
      for (int64_t p = gptr[g]; p < gptr[g + 1]; ++p) {
        const float* xb = xp + prow[p] * d_in;
        project_all(a, xb, r, d_in, pcoeff[p], low.data());
        expand(low.data(), bt, r, d_out, part + p * d_out);
      }
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
