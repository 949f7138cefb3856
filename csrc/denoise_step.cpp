// Native CPU denoise_step: the C++ twin of dmpo_fast/ops/denoise_step.py (read its header first).
//
// For every active position (b, l), one pass over the vocabulary in tiles of kTile columns:
//
//     z          = float(logits[b, l, v]) · logit_scale, −∞ at mask_id
//     token      = argmax_v (z_v · inv_t + g_v)   g_v = −log(−log u_v), u from Philox (argmax z when greedy)
//     confidence = exp(z_token − max z) / Σ_v exp(z_v − max z)          (untempered)
//
// with the running max, the rescaled Σ exp and the best noisy score folded tile by tile, so a row of logits is
// read from memory once and no noise or probability row is ever stored. Then, per sequence b, the commit rule
// (num_transfer / threshold / factor) on the [L] confidences with a stable descending sort, as
// ``commit_mask`` does in torch.
//
// Random numbers: Gumbel noise of column v is word (v mod 4) of philox(seed; v / 4, p, r, 4·t + 0) with
// p = l + position_offset, r = rows[b], t = step[b]; the random-remasking score is word 0 of
// philox(seed; 0, p, r, 4·t + 1). These are the counters of the eager reference and the Triton kernel, so all
// three draw the same tokens for the same seed (up to ties broken by one-ulp differences of log / exp).
//
// Rounding matches the reference where it decides tokens: z · inv_t and + g are separate fp32 operations (the
// build passes -ffp-contract=off so no FMA fuses them), inv_t and the threshold are rounded to fp32 as torch
// does for a Python scalar, and log / exp are SLEEF's 1-ulp versions, as torch's CPU kernels use.
// Confidences differ from the reference by a few ulp (another summation order); NaN logits give an unspecified
// token.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "philox.h"

namespace dmpo_fast {
namespace {

using Vec = at::vec::Vectorized<float>;

// 512 fp32 logits + 512 scores = 4 KiB: both stay in L1 while the tile is reduced. A multiple of 4 (one Philox
// call per 4 columns, so tile starts fall on counter boundaries) and of the vector width.
constexpr int64_t kTile = 512;
constexpr uint32_t kStreamGumbel = 0;
constexpr uint32_t kStreamRemask = 1;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct SampleOptions {
  uint64_t seed;
  float inv_t;  // 1/T rounded to fp32; unused when greedy
  bool greedy;  // T = 0: argmax z, no noise
  float logit_scale;
  int64_t mask_id;  // −1: none
};

struct Sample {
  int64_t token;
  float confidence;
};

inline float horizontal_max(const Vec& v) {
  alignas(64) float lanes[Vec::size()];
  v.store(lanes);
  float m = lanes[0];
  for (int64_t i = 1; i < Vec::size(); ++i) m = std::max(m, lanes[i]);
  return m;
}

inline float horizontal_sum(const Vec& v) {
  alignas(64) float lanes[Vec::size()];
  v.store(lanes);
  float s = 0.f;
  for (int64_t i = 0; i < Vec::size(); ++i) s += lanes[i];
  return s;
}

// Token and untempered confidence of one row of V logits; (c1, c2, c3) are the row's Philox counter words.
template <typename scalar_t>
Sample sample_row(const scalar_t* src, int64_t V, const SampleOptions& o, uint32_t c1, uint32_t c2,
                  uint32_t c3) {
  alignas(64) float z[kTile];
  alignas(64) float score[kTile];
  float m = kNegInf, s = 0.f;  // running max and Σ exp(z − m)
  float best = kNegInf, z_best = kNegInf;
  int64_t best_col = 0;
  for (int64_t t0 = 0; t0 < V; t0 += kTile) {
    const int64_t n = std::min(kTile, V - t0);
    const int64_t nv = (n + Vec::size() - 1) / Vec::size() * Vec::size();  // padded with −∞
    // z = logits · scale and its max in one sweep; the vector body covers whole vectors of fp32 input.
    Vec vmax(kNegInf);
    int64_t i0 = 0;
    if constexpr (std::is_same_v<scalar_t, float>) {
      const Vec vscale(o.logit_scale);
      for (; i0 + Vec::size() <= n; i0 += Vec::size()) {
        const Vec v = Vec::loadu(src + t0 + i0) * vscale;
        v.store(z + i0);
        vmax = at::vec::maximum(vmax, v);
      }
    }
    for (int64_t i = i0; i < n; ++i) z[i] = static_cast<float>(src[t0 + i]) * o.logit_scale;
    for (int64_t i = n; i < nv; ++i) z[i] = kNegInf;
    const bool has_mask = o.mask_id >= t0 && o.mask_id < t0 + n;
    if (has_mask) {
      z[o.mask_id - t0] = kNegInf;
      i0 = 0;  // the mask column may have been the max: take it again over the whole tile
      vmax = Vec(kNegInf);
    }
    for (int64_t i = i0; i < nv; i += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(z + i));
    const float tile_max = horizontal_max(vmax);

    // Online softmax denominator: rescale the running sum when the max grows.
    if (tile_max > m) {
      s = (m == kNegInf) ? 0.f : s * std::exp(m - tile_max);
      m = tile_max;
    }
    if (m != kNegInf) {  // a tile holding only the mask token adds nothing
      const Vec vm(m);
      Vec acc(0.f);
      for (int64_t i = 0; i < nv; i += Vec::size()) acc = acc + (Vec::loadu(z + i) - vm).exp();
      s += horizontal_sum(acc);
    }

    const float* sc = z;
    float tile_best = tile_max;  // greedy: the score is z itself
    if (!o.greedy) {
      // Column t0 + 4j + k takes word k of the Philox call with c0 = t0 / 4 + j.
      philox_open_uniforms(o.seed, static_cast<uint32_t>(t0 / 4), c1, c2, c3, nv / 4, score);
      const Vec vinv(o.inv_t);
      Vec vbest(kNegInf);
      for (int64_t i = 0; i < nv; i += Vec::size()) {
        const Vec g = Vec::loadu(score + i).log().neg().log().neg();  // −log(−log u)
        const Vec noisy = Vec::loadu(z + i) * vinv + g;
        noisy.store(score + i);
        vbest = at::vec::maximum(vbest, noisy);
      }
      tile_best = horizontal_max(vbest);
      sc = score;
    }
    if (tile_best > best) {  // strict: on a tie the earlier (lower) column keeps it, as torch.argmax
      int64_t i = 0;
      while (i + 1 < nv && sc[i] != tile_best) ++i;
      best = tile_best;
      best_col = t0 + i;
      z_best = z[i];
    }
  }
  const float m_safe = (m == kNegInf) ? 0.f : m;
  return {best_col, std::exp(z_best - m_safe) / s};
}

SampleOptions make_options(int64_t seed, double inv_t, double logit_scale, int64_t mask_id) {
  return {static_cast<uint64_t>(seed), static_cast<float>(inv_t), !(inv_t > 0.0),
          static_cast<float>(logit_scale), mask_id};
}

// Rows of at least ~32K columns per task: below that the thread start-up costs more than the row.
int64_t row_grain(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

void check_counter(const at::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == n,
              "dmpo_fast::denoise: ", name, " must be a CPU int64 tensor of shape [", n, "]");
}

// sample_rows(logits [N, V], pos [N], row_key [N], step [N]) -> (token [N] int64, confidence [N] fp32).
std::tuple<at::Tensor, at::Tensor> sample_rows_cpu(const at::Tensor& logits, const at::Tensor& pos,
                                                   const at::Tensor& row_key, const at::Tensor& step,
                                                   int64_t seed, double inv_t, double logit_scale,
                                                   int64_t mask_id) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2, "dmpo_fast::sample_rows: logits must be [N, V] on CPU");
  const at::Tensor z = logits.stride(1) == 1 ? logits : logits.contiguous();
  const int64_t N = z.size(0), V = z.size(1);
  check_counter(pos, "pos", N);
  check_counter(row_key, "row_key", N);
  check_counter(step, "step", N);
  const at::Tensor pos_c = pos.contiguous(), key_c = row_key.contiguous(), step_c = step.contiguous();
  at::Tensor token = at::empty({N}, z.options().dtype(at::kLong));
  at::Tensor conf = at::empty({N}, z.options().dtype(at::kFloat));
  const SampleOptions o = make_options(seed, inv_t, logit_scale, mask_id);
  const int64_t* p = pos_c.data_ptr<int64_t>();
  const int64_t* r = key_c.data_ptr<int64_t>();
  const int64_t* t = step_c.data_ptr<int64_t>();
  int64_t* tok = token.data_ptr<int64_t>();
  float* cf = conf.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "dmpo_fast_sample_rows", [&] {
    const scalar_t* base = z.data_ptr<scalar_t>();
    const int64_t stride = z.stride(0);
    at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const Sample smp = sample_row(base + i * stride, V, o, static_cast<uint32_t>(p[i]),
                                      static_cast<uint32_t>(r[i]),
                                      static_cast<uint32_t>(4 * t[i] + kStreamGumbel));
        tok[i] = smp.token;
        cf[i] = smp.confidence;
      }
    });
  });
  return {token, conf};
}

enum class Rule { kTopK, kThreshold, kFactor };

// How many of the n candidates (sorted by descending score) commit; see commit_mask in denoise_step.py.
int64_t commit_count(const std::vector<std::pair<float, int64_t>>& sorted, Rule rule, int64_t num_transfer,
                     float threshold, float factor) {
  const int64_t n = static_cast<int64_t>(sorted.size());
  int64_t k = 0;
  if (rule == Rule::kTopK) {
    k = num_transfer;
  } else if (rule == Rule::kThreshold) {
    for (const auto& cand : sorted) k += cand.first >= threshold;  // a count, as torch's sum (NaN: never)
    k = std::max<int64_t>(k, 1);
  } else {
    // rank i (0-based) passes when (i + 2)·(1 − c_i) <= factor, in fp32 as torch computes it; the passing
    // ranks form a prefix.
    while (k < n && static_cast<float>(k + 2) * (1.0f - sorted[k].first) <= factor) ++k;
    k = std::max<int64_t>(k, 1);
  }
  return std::min(k, n);
}

// denoise_step from logits, everything in one call: sample the active positions, commit per row.
std::tuple<at::Tensor, at::Tensor, at::Tensor> denoise_step_cpu(
    const at::Tensor& logits, const at::Tensor& x, const at::Tensor& active, const at::Tensor& rows,
    const at::Tensor& step, const std::optional<at::Tensor>& num_transfer, int64_t position_offset, int64_t seed,
    double inv_t, double logit_scale, int64_t mask_id, std::optional<double> threshold,
    std::optional<double> factor, bool random_remask) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 3, "dmpo_fast::denoise_step: logits must be [B, L, V] on CPU");
  const at::Tensor src = logits.stride(2) == 1 ? logits : logits.contiguous();
  const int64_t B = src.size(0), L = src.size(1), V = src.size(2);
  TORCH_CHECK(x.dim() == 2 && x.size(0) == B && x.size(1) == L, "dmpo_fast::denoise_step: x must be [B, L]");
  TORCH_CHECK(x.scalar_type() == at::kLong || x.scalar_type() == at::kInt, "dmpo_fast::denoise_step: x must be int32 or int64");
  TORCH_CHECK(active.scalar_type() == at::kBool && active.dim() == 2 && active.size(0) == B && active.size(1) == L,
              "dmpo_fast::denoise_step: active must be a bool [B, L] tensor");
  check_counter(rows, "rows", B);
  check_counter(step, "step", B);
  Rule rule = Rule::kFactor;
  if (num_transfer.has_value()) {
    check_counter(*num_transfer, "num_transfer", B);
    rule = Rule::kTopK;
  } else if (threshold.has_value()) {
    rule = Rule::kThreshold;
  }
  TORCH_CHECK(rule != Rule::kFactor || factor.has_value(),
              "dmpo_fast::denoise_step: one of num_transfer, threshold, factor is required");

  const at::Tensor act = active.contiguous(), rows_c = rows.contiguous(), step_c = step.contiguous();
  const at::Tensor nt = num_transfer.has_value() ? num_transfer->contiguous() : at::Tensor();
  const bool* a = act.data_ptr<bool>();
  const int64_t* rk = rows_c.data_ptr<int64_t>();
  const int64_t* st = step_c.data_ptr<int64_t>();
  std::vector<int64_t> flat;  // active positions b·L + l, in order
  for (int64_t i = 0; i < B * L; ++i)
    if (a[i]) flat.push_back(i);
  const int64_t N = static_cast<int64_t>(flat.size());

  at::Tensor tokens = at::zeros({B, L}, src.options().dtype(at::kLong));
  at::Tensor confidence = at::zeros({B, L}, src.options().dtype(at::kFloat));
  int64_t* tok = tokens.data_ptr<int64_t>();
  float* cf = confidence.data_ptr<float>();
  const SampleOptions o = make_options(seed, inv_t, logit_scale, mask_id);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "dmpo_fast_denoise_step", [&] {
    const scalar_t* base = src.data_ptr<scalar_t>();
    const int64_t s0 = src.stride(0), s1 = src.stride(1);
    at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = flat[i] / L, l = flat[i] % L;
        const uint32_t pos = static_cast<uint32_t>(l + position_offset);
        const uint32_t key = static_cast<uint32_t>(rk[b]);
        const Sample smp = sample_row(base + b * s0 + l * s1, V, o, pos, key,
                                      static_cast<uint32_t>(4 * st[b] + kStreamGumbel));
        tok[flat[i]] = smp.token;
        cf[flat[i]] = random_remask
                          ? uniform_from_bits(
                                philox4x32_10(o.seed, 0u, pos, key, static_cast<uint32_t>(4 * st[b] + kStreamRemask)).w0)
                          : smp.confidence;
      }
    });
  });

  at::Tensor committed = at::zeros({B, L}, act.options());
  bool* cm = committed.data_ptr<bool>();
  const int64_t* ntp = nt.defined() ? nt.data_ptr<int64_t>() : nullptr;
  const float thr = threshold.has_value() ? static_cast<float>(*threshold) : 0.f;
  const float fac = factor.has_value() ? static_cast<float>(*factor) : 0.f;
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(L, 1)), [&](int64_t begin, int64_t end) {
    std::vector<std::pair<float, int64_t>> cand;
    for (int64_t b = begin; b < end; ++b) {
      cand.clear();
      for (int64_t l = 0; l < L; ++l)
        if (a[b * L + l]) cand.emplace_back(cf[b * L + l], l);
      // Stable descending sort: ties keep position order. NaN sorts first, as in torch.sort(descending=True).
      auto key_of = [](float c) { return std::isnan(c) ? std::numeric_limits<float>::infinity() : c; };
      std::stable_sort(cand.begin(), cand.end(),
                       [&](const auto& p, const auto& q) { return key_of(p.first) > key_of(q.first); });
      const int64_t k = commit_count(cand, rule, ntp ? ntp[b] : 0, thr, fac);
      for (int64_t i = 0; i < k; ++i) cm[b * L + cand[i].second] = true;
    }
  });

  at::Tensor x_new = x.clone(at::MemoryFormat::Contiguous);
  AT_DISPATCH_INDEX_TYPES(x_new.scalar_type(), "dmpo_fast_denoise_write", [&] {
    index_t* xn = x_new.data_ptr<index_t>();
    for (int64_t i = 0; i < B * L; ++i)
      if (cm[i]) xn[i] = static_cast<index_t>(tok[i]);
  });
  return {x_new, committed, confidence};
}

}  // namespace
}  // namespace dmpo_fast

TORCH_LIBRARY_FRAGMENT(dmpo_fast, m) {
  m.def(
      "sample_rows(Tensor logits, Tensor pos, Tensor row_key, Tensor step, int seed, float inv_t, "
      "float logit_scale, int mask_id) -> (Tensor, Tensor)");
  m.def(
      "denoise_step(Tensor logits, Tensor x, Tensor active, Tensor rows, Tensor step, Tensor? num_transfer, "
      "int position_offset, int seed, float inv_t, float logit_scale, int mask_id, float? threshold, "
      "float? factor, bool random_remask) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dmpo_fast, CPU, m) {
  m.impl("sample_rows", &dmpo_fast::sample_rows_cpu);
  m.impl("denoise_step", &dmpo_fast::denoise_step_cpu);
}
