// GeoNorm's geodesic step as one CPU kernel per direction (titan_geonorm/geodesic_kernel.py).
//
// The same maths as titan_geonorm/geonorm.py (`_row_stats`, `_row_coefficients`,
// `_row_coefficients_backward`, `_FusedStep.backward`), row by row: each row is read from memory
// once per direction and stays in cache for the next pass over it, and the per-row scalars are
// plain C++ arithmetic instead of ~170 small tensor ops. Row sums and the scalars are in double.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

namespace {

// x86-64 builds default to SSE2; the row loops get an AVX2/FMA clone picked at load time.
#if defined(__x86_64__) && defined(__GNUC__)
#define ROW_LOOP __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define ROW_LOOP
#endif
// Inlined into each clone, so it is compiled for the clone's instruction set (and no call
// passes a row's coefficients through memory).
#if defined(__GNUC__)
#define IN_CLONE inline __attribute__((always_inline))
#else
#define IN_CLONE inline
#endif

// As `_MIN_SQ_NORM` and `_SERIES` in geonorm.py.
constexpr double kMin = 1e-10;
constexpr double kSeries = 1e-4;

// `step` and `bias` are the scaled ones, a_k s(k) and b_k s(k); `decay` is s(k), by which the
// gradients of a_k and b_k are scaled.
struct Options {
  double step, bias, decay, theta_max, theta_base_max;
  bool retraction, prenorm;
};

Options options(double step, double bias, double decay, double theta_max, double theta_base_max, bool retraction,
                bool prenorm) {
  return {step * decay, bias * decay, decay, theta_max, theta_base_max, retraction, prenorm};
}

// `_row_coefficients` for one row: coefficients of h and v, and what the backward reads.
struct Row {
  double one_c, ratio, inv_ratio, raw, theta0, base, theta1, per_ratio, shrink, theta, cos, sinc, scale;
  bool series, held;
  double coef_h() const { return cos * scale; }
  double coef_v() const { return sinc * per_ratio * shrink * scale; }
};

// What forward keeps per row for backward: the row statistics and their coefficients, so that
// backward does not recompute the division/sqrt/sincos chain (about half of its time at dim 64).
struct Saved {
  double sq, hu, v_norm;
  Row r;
};

IN_CLONE Row coefficients(double sq, double hu, double v_norm, const Options& o) {
  Row r{};
  r.one_c = 1 + hu / sq;
  r.ratio = v_norm / std::sqrt(sq);
  r.inv_ratio = 1 / std::max(r.ratio, kMin);
  double theta;
  if (o.retraction) {
    r.raw = theta = std::atan2(r.ratio, r.one_c);
    r.series = r.one_c > 0 && r.ratio < kSeries * std::abs(r.one_c);
    r.base = r.series ? 1 / std::max(std::abs(r.one_c), kMin) : theta * r.inv_ratio;
    r.held = std::isfinite(o.theta_base_max) && theta > o.theta_base_max;
    if (r.held) {
      theta = o.theta_base_max;
      r.base = o.theta_base_max * r.inv_ratio;
    }
  } else if (std::isinf(o.theta_base_max)) {
    theta = r.ratio;
    r.base = 1;
  } else {
    theta = std::min(r.ratio, o.theta_base_max);
    r.base = o.theta_base_max / std::max(r.ratio, o.theta_base_max);
  }
  r.theta0 = theta;
  r.theta1 = o.step * theta + o.bias;
  r.per_ratio = o.step * r.base + o.bias * r.inv_ratio;
  r.shrink = o.theta_max / std::max(std::abs(r.theta1), o.theta_max);
  r.theta = r.theta1 * r.shrink;
  r.cos = std::cos(r.theta);
  r.sinc = r.theta == 0 ? 1 : std::sin(r.theta) / r.theta;
  r.scale = o.prenorm ? std::sqrt(r.one_c * r.one_c + r.ratio * r.ratio) : 1;
  return r;
}

// `_row_coefficients_backward` for one row: d/d(ratio), d/d(1 + c), d/d step, d/d bias of
// g_h coef_h + g_v coef_v (its docstring derives each line).
struct RowGrad {
  double ratio, one_c, step, bias;
};

IN_CLONE RowGrad coefficients_backward(const Row& r, double g_h, double g_v, const Options& o) {
  const double k = r.per_ratio * r.shrink;
  const double t2 = r.theta * r.theta;
  const double dsinc = std::abs(r.theta) < 0.1 ? r.theta * (t2 * (1.0 / 30 - t2 / 840) - 1.0 / 3)
                                               : (r.cos - r.sinc) / r.theta;
  const double g_theta = r.scale * (g_v * k * dsinc - g_h * r.sinc * r.theta);
  const double g_k = r.scale * g_v * r.sinc;
  double g_theta1 = g_theta * r.shrink;
  if (std::abs(r.theta1) > o.theta_max) {
    g_theta1 -= r.shrink / r.theta1 * (r.theta1 * g_theta + r.per_ratio * g_k);
  }
  const double g_per = g_k * r.shrink;
  RowGrad out{};
  out.step = g_theta1 * r.theta0 + g_per * r.base;
  out.bias = g_theta1 + g_per * r.inv_ratio;
  double g_theta0 = g_theta1 * o.step;
  double g_base = g_per * o.step;
  const bool live = r.ratio >= kMin;
  const double inv_sq = r.inv_ratio * r.inv_ratio;
  double g_ratio = live ? -g_per * o.bias * inv_sq : 0;
  double g_one = 0;
  if (o.prenorm) {
    const double g_scale = (g_h * r.cos + g_v * k * r.sinc) / r.scale;
    g_one = g_scale * r.one_c;
    g_ratio += g_scale * r.ratio;
  }
  if (o.retraction) {
    if (r.held) {
      if (live) g_ratio -= g_base * o.theta_base_max * inv_sq;
      g_theta0 = g_base = 0;
    }
    if (r.series && std::abs(r.one_c) >= kMin) {
      g_one -= g_base * (r.one_c > 0 ? 1 : -1) / (r.one_c * r.one_c);
    }
    if (!r.series) {
      g_theta0 += g_base * r.inv_ratio;
      if (live) g_ratio -= g_base * r.raw * inv_sq;
    }
    const double den = r.one_c * r.one_c + r.ratio * r.ratio;
    g_ratio += g_theta0 * r.one_c / den;
    g_one -= g_theta0 * r.ratio / den;
  } else if (std::isinf(o.theta_base_max)) {
    g_ratio += g_theta0;
  } else {
    if (r.ratio <= o.theta_base_max) g_ratio += g_theta0;
    if (r.ratio >= o.theta_base_max) g_ratio -= g_base * r.base * r.inv_ratio;
  }
  out.ratio = g_ratio;
  out.one_c = g_one;
  return out;
}

// Rows per ~16K elements: the unit of work handed to a thread.
int64_t grain(int64_t dim) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(dim, 1)); }

// (rows, dim) of rows laid out along the last dimension.
std::pair<int64_t, int64_t> row_shape(const at::Tensor& h) {
  TORCH_CHECK(h.dim() >= 1, "geodesic_step: h must have a row dimension");
  const int64_t dim = h.size(-1);
  return {dim == 0 ? 0 : h.numel() / dim, dim};
}

void check_rows(const at::Tensor& x, const at::Tensor& h, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "geodesic_step: ", name, " must be a CPU tensor");
  TORCH_CHECK(x.sizes() == h.sizes(), "geodesic_step: ", name, " has shape ", x.sizes(), ", h has ", h.sizes());
  TORCH_CHECK(x.scalar_type() == h.scalar_type(), "geodesic_step: ", name, " and h differ in dtype");
}

// Rows go in blocks: first the passes that read them, then the per-row scalars of the whole block
// (independent across rows, so the CPU overlaps their division/sqrt/sincos chains instead of
// waiting on each), then the writes while the block is still in cache.
constexpr int64_t kBlock = 32;

int64_t block_rows(int64_t dim) { return std::min(grain(dim), kBlock); }

// Macro arguments cannot hold the `omp simd` pragmas, so the row loops live in templates.

// <a, b> and <a, c> in one pass over the row, summed in double.
template <typename scalar_t>
IN_CLONE void two_dots(const scalar_t* a, const scalar_t* b, const scalar_t* c, int64_t dim, double& ab,
                       double& ac) {
  double s = 0, t = 0;
#pragma omp simd reduction(+ : s, t)
  for (int64_t i = 0; i < dim; ++i) {
    s += double(a[i]) * b[i];
    t += double(a[i]) * c[i];
  }
  ab = s;
  ac = t;
}

template <typename scalar_t>
ROW_LOOP void forward_range(const scalar_t* hp, const scalar_t* up, scalar_t* op, Saved* sp, int64_t begin,
                            int64_t end, int64_t dim, const Options& o) {
  double coef_h[kBlock], coef_u[kBlock];
  for (int64_t first = begin; first < end; first += block_rows(dim)) {
    const int64_t n = std::min(block_rows(dim), end - first);
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t* x = hp + (first + j) * dim;
      const scalar_t* y = up + (first + j) * dim;
      double hh, hu;
      two_dots(x, x, y, dim, hh, hu);
      const double sq = std::max(hh, kMin);
      const double c = hu / sq;
      double vv = 0;
#pragma omp simd reduction(+ : vv)
      for (int64_t i = 0; i < dim; ++i) {
        const double v = y[i] - c * x[i];
        vv += v * v;
      }
      Saved& saved = sp[first + j];
      saved.sq = sq;
      saved.hu = hu;
      saved.v_norm = std::sqrt(vv);
    }
    for (int64_t j = 0; j < n; ++j) {
      Saved& saved = sp[first + j];
      saved.r = coefficients(saved.sq, saved.hu, saved.v_norm, o);
      // h' = coef_h h + coef_v (u - c h).
      const double coef_v = saved.r.coef_v();
      coef_h[j] = saved.r.coef_h() - coef_v * saved.hu / saved.sq;
      coef_u[j] = coef_v;
    }
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t* x = hp + (first + j) * dim;
      const scalar_t* y = up + (first + j) * dim;
      scalar_t* z = op + (first + j) * dim;
      const scalar_t a = scalar_t(coef_h[j]), b = scalar_t(coef_u[j]);
#pragma omp simd
      for (int64_t i = 0; i < dim; ++i) z[i] = a * x[i] + b * y[i];
    }
  }
}

template <typename scalar_t>
ROW_LOOP void backward_range(const scalar_t* gp, const scalar_t* hp, const scalar_t* up, const Saved* sp,
                             scalar_t* ghp, scalar_t* gup, double* scalars, int64_t begin, int64_t end, int64_t dim,
                             const Options& o) {
  // Per row of the block: <g,h>, <g,u>, then the coefficients of g, h, u in both gradients.
  double gh[kBlock], gu[kBlock], a_g[kBlock], a_h[kBlock], a_u[kBlock], b_g[kBlock], b_u[kBlock];
  for (int64_t first = begin; first < end; first += block_rows(dim)) {
    const int64_t n = std::min(block_rows(dim), end - first);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t offset = (first + j) * dim;
      two_dots(gp + offset, hp + offset, up + offset, dim, gh[j], gu[j]);
    }
    for (int64_t j = 0; j < n; ++j) {
      const int64_t row = first + j;
      const double sq = sp[row].sq, hu = sp[row].hu, v_norm = sp[row].v_norm;
      const double c = hu / sq;
      const Row& r = sp[row].r;
      const RowGrad d = coefficients_backward(r, gh[j], gu[j] - c * gh[j], o);
      scalars[2 * row] = d.step;
      scalars[2 * row + 1] = d.bias;
      // `_FusedStep.backward`: ratio = ||v||/||h||, 1 + c = 1 + <h,u>/||h||^2.
      const double coef_v = r.coef_v();
      const double d_vn = d.ratio / std::sqrt(sq);
      const double d_hu = d.one_c / sq;
      const double d_sq = -(d_hu * c + 0.5 * d_vn * v_norm / sq);
      const double dc = -coef_v * gh[j];
      const double dd = sq > kMin ? d_sq - dc * c / sq : 0;
      const double e = v_norm > 0 ? d_vn / std::max(v_norm, kMin) : 0;
      const double k = d_hu + dc / sq - c * e;
      a_g[j] = r.coef_h() - c * coef_v;
      a_h[j] = 2 * dd + c * c * e;
      a_u[j] = k;  // also the coefficient of h in d/du
      b_g[j] = coef_v;
      b_u[j] = e;
    }
    for (int64_t j = 0; j < n; ++j) {
      const int64_t offset = (first + j) * dim;
      const scalar_t* gr = gp + offset;
      const scalar_t* x = hp + offset;
      const scalar_t* y = up + offset;
      scalar_t* zh = ghp + offset;
      scalar_t* zu = gup + offset;
      const scalar_t ag = scalar_t(a_g[j]), ah = scalar_t(a_h[j]), k = scalar_t(a_u[j]);
      const scalar_t bg = scalar_t(b_g[j]), e = scalar_t(b_u[j]);
#pragma omp simd
      for (int64_t i = 0; i < dim; ++i) {
        zh[i] = ag * gr[i] + ah * x[i] + k * y[i];
        zu[i] = bg * gr[i] + k * x[i] + e * y[i];
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& h_in, const at::Tensor& u_in, double step, double bias,
                                           double decay, double theta_max, double theta_base_max, bool retraction,
                                           bool prenorm) {
  check_rows(u_in, h_in, "u");
  const Options o = options(step, bias, decay, theta_max, theta_base_max, retraction, prenorm);
  const at::Tensor h = h_in.contiguous(), u = u_in.contiguous();
  const auto [rows, dim] = row_shape(h);
  at::Tensor out = at::empty_like(h);
  // One `Saved` per row, as bytes: only this file's backward reads them.
  at::Tensor saved = at::empty({rows, int64_t(sizeof(Saved))}, h.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "geodesic_step_forward", [&] {
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    Saved* sp = reinterpret_cast<Saved*>(saved.mutable_data_ptr<uint8_t>());
    at::parallel_for(0, rows, grain(dim), [&](int64_t begin, int64_t end) {
      forward_range<scalar_t>(hp, up, op, sp, begin, end, dim, o);
    });
  });
  return {out, saved};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& g_in, const at::Tensor& h_in,
                                                        const at::Tensor& u_in, const at::Tensor& saved,
                                                        double step, double bias, double decay, double theta_max,
                                                        double theta_base_max, bool retraction, bool prenorm) {
  check_rows(g_in, h_in, "grad");
  check_rows(u_in, h_in, "u");
  const Options o = options(step, bias, decay, theta_max, theta_base_max, retraction, prenorm);
  const at::Tensor g = g_in.contiguous(), h = h_in.contiguous(), u = u_in.contiguous();
  const auto [rows, dim] = row_shape(h);
  TORCH_CHECK(saved.scalar_type() == at::kByte && saved.is_contiguous() &&
                  saved.numel() == rows * int64_t(sizeof(Saved)) &&
                  reinterpret_cast<uintptr_t>(saved.const_data_ptr()) % alignof(Saved) == 0,
              "geodesic_step: bad saved rows (pass forward's second output)");
  at::Tensor grad_h = at::empty_like(h), grad_u = at::empty_like(u);
  // d step and d bias per row, summed below in row order (the same sum for any thread count).
  std::vector<double> row_scalars(2 * rows);
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "geodesic_step_backward", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    const Saved* sp = reinterpret_cast<const Saved*>(saved.const_data_ptr<uint8_t>());
    scalar_t* ghp = grad_h.mutable_data_ptr<scalar_t>();
    scalar_t* gup = grad_u.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain(dim), [&](int64_t begin, int64_t end) {
      backward_range<scalar_t>(gp, hp, up, sp, ghp, gup, row_scalars.data(), begin, end, dim, o);
    });
  });
  double d_step = 0, d_bias = 0;
  for (int64_t row = 0; row < rows; ++row) {
    d_step += row_scalars[2 * row];
    d_bias += row_scalars[2 * row + 1];
  }
  d_step *= o.decay;
  d_bias *= o.decay;
  // Shape (1,) in the rows' dtype: a step parameter's, so usually no cast.
  at::Tensor grad_step = at::empty({1}, h.options()), grad_bias = at::empty({1}, h.options());
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "geodesic_step_scalars", [&] {
    grad_step.mutable_data_ptr<scalar_t>()[0] = scalar_t(d_step);
    grad_bias.mutable_data_ptr<scalar_t>()[0] = scalar_t(d_bias);
  });
  return {grad_h, grad_u, grad_step, grad_bias};
}

}  // namespace

TORCH_LIBRARY(titan_geonorm, m) {
  m.def(
      "geodesic_step_forward(Tensor h, Tensor u, float step, float bias, float decay, float theta_max, "
      "float theta_base_max, bool retraction, bool prenorm) -> (Tensor, Tensor)");
  m.def(
      "geodesic_step_backward(Tensor grad, Tensor h, Tensor u, Tensor saved, float step, float bias, float decay, "
      "float theta_max, float theta_base_max, bool retraction, bool prenorm) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(titan_geonorm, CPU, m) {
  m.impl("geodesic_step_forward", TORCH_FN(forward));
  m.impl("geodesic_step_backward", TORCH_FN(backward));
}
