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
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <vector>

namespace {

constexpr int64_t kLanes = 16;  // floats per vector block: 64 output columns stay in registers across the rank

// dot(a, x) over d values: one row of A streamed from memory in order (which is what a step at batch 16 is bound by).
inline float dot(const float* a, const float* x, int64_t d) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; ++i) s += a[i] * x[i];
  return s;
}

// out[j] = sum_t low[t] * bt[t, j] for j < d (row stride d), 4 * kLanes columns at a time held in registers.
inline void expand(const float* low, const float* bt, int64_t r, int64_t d, float* out) {
  constexpr int64_t width = 4 * kLanes;
  const int64_t full = d - d % width;
  for (int64_t j0 = 0; j0 < full; j0 += width) {
    float acc[width] = {};
    for (int64_t t = 0; t < r; ++t) {
      const float s = low[t];
      const float* row = bt + t * d + j0;
#pragma omp simd
      for (int64_t l = 0; l < width; ++l) acc[l] += s * row[l];
    }
    for (int64_t l = 0; l < width; ++l) out[j0 + l] = acc[l];
  }
  for (int64_t j = full; j < d; ++j) {
    float s = 0.f;
    for (int64_t t = 0; t < r; ++t) s += low[t] * bt[t * d + j];
    out[j] = s;
  }
}

}  // namespace

void library_decode(const torch::Tensor& x, const torch::Tensor& A, const torch::Tensor& Bt,
                    const torch::Tensor& group_ptr, const torch::Tensor& group_adapter, const torch::Tensor& pair_row,
                    const torch::Tensor& pair_coeff, const torch::Tensor& row_ptr, const torch::Tensor& row_pair,
                    torch::Tensor& y) {
  const int64_t groups = group_adapter.size(0), pairs = pair_row.size(0), rows = y.size(0);
  const int64_t r = A.size(1), d_in = A.size(2), d_out = Bt.size(2);
  const float* xp = x.data_ptr<float>();
  const float* ap = A.data_ptr<float>();
  const float* bp = Bt.data_ptr<float>();
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

  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    std::vector<float> low(r);
    for (int64_t g = g0; g < g1; ++g) {
      const float* a = ap + gadapter[g] * r * d_in;
      const float* bt = bp + gadapter[g] * r * d_out;
      for (int64_t p = gptr[g]; p < gptr[g + 1]; ++p) {
        const float* xb = xp + prow[p] * d_in;
        for (int64_t t = 0; t < r; ++t) low[t] = pcoeff[p] * dot(a + t * d_in, xb, d_in);
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("library_decode", &library_decode, "per-row LoRA mixtures, one decode token per row, from the stacked library");
}
