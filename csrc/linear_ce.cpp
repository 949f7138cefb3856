// Native CPU per-row parts of the linear cross-entropy ops (dmpo_fast/ops/linear_ce.py, chunked path):
// ce_rows_ for weighted_linear_ce, logprob_rows / logprob_grad_rows_ for linear_logprob.
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
// linear_logprob cannot form G in its forward: the per-row upstream gradient g_i only arrives in the backward.
// Its forward keeps lse_i (logprob_rows: max and Σexp, nothing written), and its backward recomputes each chunk
// of logits and turns it into g_i · d logp_i / d Z_i in one sweep (logprob_grad_rows_):
//
//     logp_i = Z_{i, y_i} − lse_i           G_iv = −g_i · exp(Z_iv − lse_i)        G_{i, y_i} += g_i
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

void check_rows(const char* op, const at::Tensor& logits, const at::Tensor& targets) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.stride(1) == 1,
              "dmpo_fast::", op, ": logits must be a CPU [c, V] tensor with unit column stride");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
              "dmpo_fast::", op, ": logits must be float32 or float64");
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.size(0) == logits.size(0),
              "dmpo_fast::", op, ": targets must be int64 [", logits.size(0), "]");
}

void check_targets(const char* op, const int64_t* yp, int64_t c, int64_t V) {
  for (int64_t i = 0; i < c; ++i)
    TORCH_CHECK(yp[i] >= 0 && yp[i] < V, "dmpo_fast::", op, ": target ", yp[i], " outside [0, ", V, ")");
}

// Rows of at least ~32K values per task: below that the thread start-up costs more than the row.
int64_t grain(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

// ce_rows_(logits [c, V], targets [c], weights [c], grad) -> ce [c]; with grad, logits becomes G (see above).
at::Tensor ce_rows_cpu(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& weights, bool grad) {
  check_rows("ce_rows_", logits, targets);
  const int64_t c = logits.size(0), V = logits.size(1);
  TORCH_CHECK(weights.scalar_type() == logits.scalar_type() && weights.dim() == 1 && weights.size(0) == c,
              "dmpo_fast::ce_rows_: weights must be [", c, "] of the logits dtype");
  const at::Tensor y = targets.contiguous(), w = weights.contiguous();
  at::Tensor ce = at::empty({c}, logits.options());
  const int64_t* yp = y.data_ptr<int64_t>();
  check_targets("ce_rows_", yp, c, V);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "dmpo_fast_ce_rows", [&] {
    scalar_t* base = logits.data_ptr<scalar_t>();
    const int64_t stride = logits.stride(0);
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* out = ce.data_ptr<scalar_t>();
    at::parallel_for(0, c, grain(V), [&](int64_t begin, int64_t end) {
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

// logprob_rows(logits [c, V], targets [c]) -> (logp [c], lse [c]); logits are only read.
std::tuple<at::Tensor, at::Tensor> logprob_rows_cpu(const at::Tensor& logits, const at::Tensor& targets) {
  check_rows("logprob_rows", logits, targets);
  const int64_t c = logits.size(0), V = logits.size(1);
  const at::Tensor y = targets.contiguous();
  const int64_t* yp = y.data_ptr<int64_t>();
  check_targets("logprob_rows", yp, c, V);
  at::Tensor logp = at::empty({c}, logits.options()), lse = at::empty({c}, logits.options());
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "dmpo_fast_logprob_rows", [&] {
    // sum_exp writes nothing without store: the const_cast only shares the helper.
    scalar_t* base = const_cast<scalar_t*>(logits.const_data_ptr<scalar_t>());
    const int64_t stride = logits.stride(0);
    scalar_t* lp = logp.data_ptr<scalar_t>();
    scalar_t* ls = lse.data_ptr<scalar_t>();
    at::parallel_for(0, c, grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* z = base + i * stride;
        const scalar_t m = row_max(z, V);
        ls[i] = m + std::log(sum_exp(z, V, m, /*store=*/false));
        lp[i] = z[yp[i]] - ls[i];
      }
    });
  });
  return {logp, lse};
}

// logprob_grad_rows_(logits [c, V]!, targets [c], lse [c], grad [c]): logits becomes G = g · (e_y − softmax).
void logprob_grad_rows_cpu(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                           const at::Tensor& grad) {
  check_rows("logprob_grad_rows_", logits, targets);
  const int64_t c = logits.size(0), V = logits.size(1);
  for (const at::Tensor* t : {&lse, &grad})
    TORCH_CHECK(t->scalar_type() == logits.scalar_type() && t->dim() == 1 && t->size(0) == c,
                "dmpo_fast::logprob_grad_rows_: lse and grad must be [", c, "] of the logits dtype");
  const at::Tensor y = targets.contiguous(), l = lse.contiguous(), g = grad.contiguous();
  const int64_t* yp = y.data_ptr<int64_t>();
  check_targets("logprob_grad_rows_", yp, c, V);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "dmpo_fast_logprob_grad_rows", [&] {
    using Vec = at::vec::Vectorized<scalar_t>;
    scalar_t* base = logits.data_ptr<scalar_t>();
    const int64_t stride = logits.stride(0);
    const scalar_t* lp = l.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    at::parallel_for(0, c, grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* z = base + i * stride;
        const Vec vl(lp[i]), vg(-gp[i]);
        int64_t v = 0;
        for (; v + Vec::size() <= V; v += Vec::size()) (((Vec::loadu(z + v) - vl).exp()) * vg).store(z + v);
        for (; v < V; ++v) z[v] = std::exp(z[v] - lp[i]) * -gp[i];
        z[yp[i]] += gp[i];
      }
    });
  });
}

}  // namespace
}  // namespace dmpo_fast

TORCH_LIBRARY_FRAGMENT(dmpo_fast, m) {
  m.def("ce_rows_(Tensor(a!) logits, Tensor targets, Tensor weights, bool grad) -> Tensor");
  m.def("logprob_rows(Tensor logits, Tensor targets) -> (Tensor, Tensor)");
  m.def("logprob_grad_rows_(Tensor(a!) logits, Tensor targets, Tensor lse, Tensor grad) -> ()");
}

TORCH_LIBRARY_IMPL(dmpo_fast, CPU, m) {
  m.impl("ce_rows_", &dmpo_fast::ce_rows_cpu);
  m.impl("logprob_rows", &dmpo_fast::logprob_rows_cpu);
  m.impl("logprob_grad_rows_", &dmpo_fast::logprob_grad_rows_cpu);
}
