// Native CPU per-row part of the weighted linear cross-entropy (dmpo_fast/ops/linear_ce.py, chunked path).
//
// The chunked path forms a chunk of logits Z = H·Wᵀ [c, V] with a GEMM, reduces each row to its cross-entropy,
// and, when gradients are needed, overwrites Z with the gradient of w_i·CE_i with respect to the logits,
//
//     G[i, v] = w_i · (softmax(Z_i)_v − [v = y_i]),
//
// which the next two GEMMs turn into dH = G·W and dW += Gᵀ·H. In torch that row work is five kernels over
// the chunk (logsumexp, gather, sub_, exp_, scatter_add_, mul_), each a full pass through memory. Here each
// row (V fp32 values, 125 KiB at V = 32000: it stays in L2) is handled by one thread in three sweeps —
// max; exp(z − m) stored in place and summed; scale by w / Σ — so the chunk crosses memory once each way:
//
//     lse_i = m + log Σ_v exp(Z_iv − m)        CE_i = lse_i − Z_{i, y_i}
//     G_iv  = exp(Z_iv − m) · (w_i / Σ)        G_{i, y_i} = (exp(Z_{i, y_i} − m) / Σ − 1) · w_i
//
// fp32 chunks for fp32 and lower-precision inputs, fp64 for fp64 (gradcheck), as the chunked path.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace dmpo_fast {
namespace {

template <typename T>
T row_max(const T* z, int64_t V) {
  using Vec = at::vec::Vectorized<T>;
  Vec acc(-std::numeric_limits<T>::infinity());
  int64_t i = 0;
  for (; i + Vec::size() <= V; i += Vec::size()) acc = at::vec::maximum(acc, Vec::loadu(z + i));
  alignas(64) T lanes[Vec::size()];
  acc.store(lanes);
  T m = lanes[0];
  for (int64_t j = 1; j < Vec::size(); ++j) m = std::max(m, lanes[j]);
  for (; i < V; ++i) m = std::max(m, z[i]);
  return m;
}

// Σ_v exp(z_v − m); with store, z_v is replaced by exp(z_v − m).
template <typename T>
T sum_exp(T* z, int64_t V, T m, bool store) {
  using Vec = at::vec::Vectorized<T>;
  const Vec vm(m);
  Vec acc(T(0));
  int64_t i = 0;
  for (; i + Vec::size() <= V; i += Vec::size()) {
    const Vec e = (Vec::loadu(z + i) - vm).exp();
    if (store) e.store(z + i);
    acc = acc + e;
  }
  alignas(64) T lanes[Vec::size()];
  acc.store(lanes);
  T s = T(0);
  for (int64_t j = 0; j < Vec::size(); ++j) s += lanes[j];
  for (; i < V; ++i) {
    const T e = std::exp(z[i] - m);
    if (store) z[i] = e;
    s += e;
  }
  return s;
}

template <typename T>
void scale_row(T* z, int64_t V, T c) {
  using Vec = at::vec::Vectorized<T>;
  const Vec vc(c);
  int64_t i = 0;
  for (; i + Vec::size() <= V; i += Vec::size()) (Vec::loadu(z + i) * vc).store(z + i);
  for (; i < V; ++i) z[i] *= c;
}

// ce_rows_(logits [c, V], targets [c], weights [c], grad) -> ce [c]; with grad, logits becomes G (see above).
at::Tensor ce_rows_cpu(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& weights, bool grad) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.stride(1) == 1,
              "dmpo_fast::ce_rows_: logits must be a CPU [c, V] tensor with unit column stride");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
              "dmpo_fast::ce_rows_: logits must be float32 or float64");
  const int64_t c = logits.size(0), V = logits.size(1);
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.size(0) == c,
              "dmpo_fast::ce_rows_: targets must be int64 [", c, "]");
  TORCH_CHECK(weights.scalar_type() == logits.scalar_type() && weights.dim() == 1 && weights.size(0) == c,
              "dmpo_fast::ce_rows_: weights must be [", c, "] of the logits dtype");
  const at::Tensor y = targets.contiguous(), w = weights.contiguous();
  at::Tensor ce = at::empty({c}, logits.options());
  const int64_t* yp = y.data_ptr<int64_t>();
  for (int64_t i = 0; i < c; ++i)
    TORCH_CHECK(yp[i] >= 0 && yp[i] < V, "dmpo_fast::ce_rows_: target ", yp[i], " outside [0, ", V, ")");
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "dmpo_fast_ce_rows", [&] {
    scalar_t* base = logits.data_ptr<scalar_t>();
    const int64_t stride = logits.stride(0);
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* out = ce.data_ptr<scalar_t>();
    // Rows of at least ~32K values per task: below that the thread start-up costs more than the row.
    at::parallel_for(0, c, std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* z = base + i * stride;
        const scalar_t z_y = z[yp[i]];
        const scalar_t m = row_max(z, V);
        const scalar_t s = sum_exp(z, V, m, grad);
        out[i] = m + std::log(s) - z_y;
        if (grad) {
          const scalar_t e_y = z[yp[i]];  // exp(z_y − m), stored by sum_exp
          scale_row(z, V, wp[i] / s);
          z[yp[i]] = (e_y / s - scalar_t(1)) * wp[i];
        }
      }
    });
  });
  return ce;
}

}  // namespace
}  // namespace dmpo_fast

TORCH_LIBRARY_FRAGMENT(dmpo_fast, m) {
  m.def("ce_rows_(Tensor(a!) logits, Tensor targets, Tensor weights, bool grad) -> Tensor");
}

TORCH_LIBRARY_IMPL(dmpo_fast, CPU, m) { m.impl("ce_rows_", &dmpo_fast::ce_rows_cpu); }
