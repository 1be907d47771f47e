// The CPU kernels as torch operators (namespace DSF_OP_NAMESPACE, default ``dsf``), so that
// torch.compile, torch.export and vLLM see them as ops rather than opaque calls. Which
// entry point each path code runs is decided once, when the library is loaded, from the
// CPU's features; a plan naming a path the CPU lacks is refused with an error.
//
// A factor travels as Tensor[5]: bitmap (rows, words) int32, row_offsets (rows + 1) int32,
// values (nnz) fp16 / bf16 / int8, scales (rows) fp32 for int8 values (else empty),
// columns (nnz) int16 holding uint16 column indices (or empty). Its structure must have
// passed bitmap_check (done once when a checkpoint is loaded); each call checks shapes,
// dtypes and the offsets' total only.
//
// A plan is int[5], int[7] or int[8]: word path (0 none, 1 avx2, 2 avx512, 3 avx512-256), nonzero
// path (0 portable, 1 avx2, 2 avx512), nz_min_batch (from this batch on the nonzero path),
// columns_max_batch (up to this batch the column-index path, where columns are given),
// bf16 dot path for bf16 x (0 none, 2 avx512, 3 avx512-256), then tile path for bf16
// values (0 none, 1 amx, 2 emulated tiles, 3 AVX512_BF16 pairs) and tiles_min_batch (from
// this batch on), then round_min_batch: from this batch on (0: never) fp32 x on bf16
// values is rounded to bf16 and takes the dot path.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>

#include "common.h"

#ifndef DSF_OP_NAMESPACE
#define DSF_OP_NAMESPACE dsf
#endif
// Indirections, so that the namespace macro is expanded before TORCH_LIBRARY pastes it.
#define DSF_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define DSF_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

namespace dsf {
namespace {

const char* const kWordNames[] = {"none", "avx2", "avx512", "avx512-256"};
const char* const kNzNames[] = {"portable", "avx2", "avx512"};

struct Table {
  SpmmFn words[4] = {nullptr, nullptr, nullptr, nullptr};
  SpmmFn nz[3] = {nz_portable, nullptr, nullptr};
  SpmmFn cols = nullptr;
  SpmmFn tiles[4] = {nullptr, nullptr, nullptr, nullptr};  // 1: AMX, 2: emulated tiles (tests), 3: AVX512_BF16 pairs
  DotFn dot[4] = {nullptr, nullptr, nullptr, nullptr};
  DenseFn dense = nullptr;
  AttendFn attend = attend_portable;
  std::vector<std::string> names{"portable"};
};

Table make_table() {
  Table t;
#ifdef DSF_X86
  t.tiles[2] = tiles_emulated;
  t.names.push_back("tiles-emulated");
  if (has_avx2()) {
    t.words[1] = words_avx2;
    t.nz[1] = nz_avx2;
    t.cols = cols_avx2;
    t.dense = dense_avx2;
    t.attend = attend_avx2;
    t.names.push_back("avx2");
  }
  if (has_avx512()) {
    t.words[2] = words_avx512;
    t.nz[2] = nz_avx512;
    t.names.push_back("avx512-vbmi2");
  }
  if (has_avx512_bf16()) {
    t.words[3] = words_avx512_256;
    t.dot[2] = dot_avx512;
    t.dot[3] = dot_avx512_256;
    t.tiles[3] = pairs_avx512;
    t.names.push_back("avx512-bf16");
  }
  if (has_amx()) {
    t.tiles[1] = tiles_amx;
    t.names.push_back("amx");
  }
#endif
  return t;
}

const Table kTable = make_table();  // once, at load

struct Plan {
  int64_t word, nz, nz_min_batch, columns_max_batch, dot, tiles, tiles_min_batch, round_min_batch;
};

const char* const kTileNames[] = {"none", "amx", "amx-emulated", "pairs"};

Plan unpack_plan(at::IntArrayRef p) {
  TORCH_CHECK(p.size() == 5 || p.size() == 7 || p.size() == 8,
              "a cpu-bitmap plan has 5, 7 or 8 entries (word, nz, nz_min_batch, columns_max_batch, dot[, tiles, "
              "tiles_min_batch[, round_min_batch]]), got ",
              p.size());
  Plan plan{p[0], p[1], p[2], p[3], p[4], p.size() >= 7 ? p[5] : 0, p.size() >= 7 ? p[6] : 0, p.size() == 8 ? p[7] : 0};
  TORCH_CHECK(plan.round_min_batch >= 0, "plan: round_min_batch must be >= 0 (0: never), got ", plan.round_min_batch);
  TORCH_CHECK(plan.tiles >= 0 && plan.tiles <= 3, "plan: tile path code must be 0-3, got ", plan.tiles);
  TORCH_CHECK(plan.tiles == 0 || kTable.tiles[plan.tiles], "the ", kTileNames[plan.tiles],
              " tile path is not available on this CPU");
  TORCH_CHECK(plan.word >= 0 && plan.word <= 3, "plan: word path code must be 0-3, got ", plan.word);
  TORCH_CHECK(plan.nz >= 0 && plan.nz <= 2, "plan: nonzero path code must be 0-2, got ", plan.nz);
  TORCH_CHECK(plan.dot == 0 || plan.dot == 2 || plan.dot == 3, "plan: dot path code must be 0, 2 or 3, got ",
              plan.dot);
  TORCH_CHECK(plan.word == 0 || kTable.words[plan.word], "the ", kWordNames[plan.word],
              " word path is not available on this CPU");
  TORCH_CHECK(kTable.nz[plan.nz], "the ", kNzNames[plan.nz], " nonzero path is not available on this CPU");
  TORCH_CHECK(plan.dot == 0 || kTable.dot[plan.dot], "the ", kWordNames[plan.dot],
              " bf16 dot-product path is not available on this CPU");
  return plan;
}

Factor unpack_factor(const std::vector<at::Tensor>& t, int64_t cols) {
  TORCH_CHECK(t.size() == 5, "a cpu-bitmap factor is [bitmap, row_offsets, values, scales, columns], got ", t.size(),
              " tensors");
  const at::Tensor &bitmap = t[0], &offsets = t[1], &values = t[2], &scales = t[3], &columns = t[4];
  for (const auto& x : t)
    TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "cpu-bitmap factor tensors must be contiguous CPU tensors");
  TORCH_CHECK(bitmap.dim() == 2 && bitmap.scalar_type() == at::kInt, "bitmap must be a 2-D int32 tensor");
  const int64_t rows = bitmap.size(0), words = bitmap.size(1);
  TORCH_CHECK(cols >= 0 && words == (cols + 31) / 32,
              "a factor with ", cols, " columns needs ", (cols + 31) / 32, " bitmap words per row, got ", words);
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kInt && offsets.numel() == rows + 1,
              "row_offsets must be ", rows + 1, " int32 values");
  const int kind = values.scalar_type() == at::kHalf       ? kFp16
                   : values.scalar_type() == at::kBFloat16 ? kBf16
                   : values.scalar_type() == at::kChar     ? kInt8
                                                           : -1;
  TORCH_CHECK(kind >= 0 && values.dim() == 1, "values must be a 1-D fp16, bf16 or int8 tensor, got ",
              values.scalar_type());
  const int64_t nnz = values.numel();
  TORCH_CHECK(offsets.data_ptr<int32_t>()[0] == 0 && offsets.data_ptr<int32_t>()[rows] == nnz,
              "row_offsets must start at 0 and end at the value count ", nnz);
  TORCH_CHECK(kind != kInt8 || (scales.scalar_type() == at::kFloat && scales.numel() == rows),
              "int8 values need ", rows, " fp32 row scales");
  TORCH_CHECK(columns.numel() == 0 || (columns.scalar_type() == at::kShort && columns.numel() == nnz),
              "columns must be empty or ", nnz, " int16 column indices");
  return Factor{bitmap.data_ptr<int32_t>(),
                offsets.data_ptr<int32_t>(),
                values.data_ptr(),
                kind == kInt8 ? scales.data_ptr<float>() : nullptr,
                columns.numel() ? reinterpret_cast<const uint16_t*>(columns.data_ptr<int16_t>()) : nullptr,
                nnz,
                rows,
                cols,
                words,
                kind};
}

// x: (n, cols) padded with zeros to (n, 32 * words) in ``dtype`` (in place where nothing is to do).
at::Tensor padded(const at::Tensor& x, int64_t width, at::ScalarType dtype) {
  if (x.size(1) == width && x.scalar_type() == dtype) return x.contiguous();
  at::Tensor out = at::zeros({x.size(0), width}, x.options().dtype(dtype));
  out.narrow(1, 0, x.size(1)).copy_(x);
  return out;
}

// The path a call with n rows of x in ``dtype`` takes: the one decision spmm runs on and
// bitmap_path reports.
enum class Path { kColumns, kTiles, kNonzeros, kDot, kWords };

Path choose_path(int64_t n, at::ScalarType dtype, const Factor& f, const Plan& plan) {
  if (f.columns && n <= plan.columns_max_batch && kTable.cols) return Path::kColumns;
  if (plan.tiles && n >= plan.tiles_min_batch && f.kind == kBf16) return Path::kTiles;
  if (plan.word == 0 || n >= plan.nz_min_batch) return Path::kNonzeros;
  const bool rounds = plan.round_min_batch && n >= plan.round_min_batch;  // fp32 x taken in bf16
  if ((dtype == at::kBFloat16 || rounds) && f.kind == kBf16 && plan.dot) return Path::kDot;
  return Path::kWords;
}

// y = S x for x (n, cols): (n, rows) in x's dtype, on the path the plan picks for n.
at::Tensor spmm(const at::Tensor& x, const Factor& f, const Plan& plan) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "x must be a 2-D CPU tensor, got ", x.dim(), " dimensions");
  TORCH_CHECK(x.size(1) == f.cols, "x has ", x.size(1), " columns; the factor takes ", f.cols);
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "x must be float32, bfloat16 or float16, got ", dtype);
  const int64_t n = x.size(0), width = 32 * f.words;
  at::Tensor y = at::empty({n, f.rows}, x.options().dtype(at::kFloat));
  if (n == 0 || f.rows == 0) return y.to(dtype);
  if (f.words == 0) return y.zero_().to(dtype);
  const Path path = choose_path(n, dtype, f, plan);
  if (path == Path::kColumns) {
    at::Tensor xf = x.to(at::kFloat).contiguous();
    kTable.cols(f, xf.data_ptr<float>(), f.cols, y.data_ptr<float>(), f.rows, n);
  } else if (path == Path::kTiles) {
    at::Tensor xp = padded(x, width, at::kFloat);
    kTable.tiles[plan.tiles](f, xp.data_ptr<float>(), width, y.data_ptr<float>(), f.rows, n);
  } else if (path == Path::kNonzeros) {
    TORCH_CHECK(plan.nz != 2 || f.kind != kInt8, "the avx512 nonzero path takes fp16 or bf16 values");
    at::Tensor xf = x.to(at::kFloat).contiguous();
    kTable.nz[plan.nz](f, xf.data_ptr<float>(), f.cols, y.data_ptr<float>(), f.rows, n);
  } else if (path == Path::kDot) {
    at::Tensor xb = padded(x, width, at::kBFloat16);
    kTable.dot[plan.dot](f, reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>()), width,
                         y.data_ptr<float>(), f.rows, n);
  } else {
    TORCH_CHECK(plan.word != 2 || f.kind != kInt8, "the avx512 word path takes fp16 or bf16 values");
    TORCH_CHECK(plan.word != 3 || f.kind == kBf16, "the avx512-256 word path takes bf16 values");
    at::Tensor xp = padded(x, width, at::kFloat);
    kTable.words[plan.word](f, xp.data_ptr<float>(), width, y.data_ptr<float>(), f.rows, n);
  }
  return dtype == at::kFloat ? y : y.to(dtype);
}

at::Tensor bitmap_spmm(const at::Tensor& x, const std::vector<at::Tensor>& factor, int64_t cols,
                       at::IntArrayRef plan) {
  return spmm(x, unpack_factor(factor, cols), unpack_plan(plan));
}

// y = L (R x): one op per factorized layer (half the dispatcher crossings of two).
at::Tensor bitmap_pair(const at::Tensor& x, const std::vector<at::Tensor>& right, int64_t right_cols,
                       at::IntArrayRef right_plan, const std::vector<at::Tensor>& left, int64_t left_cols,
                       at::IntArrayRef left_plan) {
  const Factor r = unpack_factor(right, right_cols), l = unpack_factor(left, left_cols);
  TORCH_CHECK(l.cols == r.rows, "the left factor takes ", l.cols, " columns; the right one gives ", r.rows);
  return spmm(spmm(x, r, unpack_plan(right_plan)), l, unpack_plan(left_plan));
}

// Bound factors: a factor's tensors, checked operands and plan kept on the C++ side under
// an integer handle, so that a call passes (x, handle, handle) instead of two lists of five
// tensors and five integers. Parsing those lists costs ~7 us per factor in the Python
// dispatcher, more than the kernel itself on SmolLM2's smaller layers at batch 1 (210
// pair calls per token). The entry holds references to the tensors, so they outlive
// their Python owners until unbound.
struct Bound {
  std::vector<at::Tensor> tensors;
  Factor f;
  Plan plan;
};

std::mutex bound_mutex;
std::unordered_map<int64_t, std::shared_ptr<const Bound>> bound_factors;
int64_t next_handle = 1;

int64_t bitmap_bind(const std::vector<at::Tensor>& factor, int64_t cols, at::IntArrayRef plan) {
  auto entry = std::make_shared<Bound>();
  entry->tensors = factor;
  entry->f = unpack_factor(entry->tensors, cols);
  entry->plan = unpack_plan(plan);
  std::lock_guard<std::mutex> lock(bound_mutex);
  const int64_t handle = next_handle++;
  bound_factors.emplace(handle, std::move(entry));
  return handle;
}

void bitmap_unbind(int64_t handle) {
  std::lock_guard<std::mutex> lock(bound_mutex);
  bound_factors.erase(handle);
}

std::shared_ptr<const Bound> bound_factor(int64_t handle) {
  std::lock_guard<std::mutex> lock(bound_mutex);
  auto it = bound_factors.find(handle);
  TORCH_CHECK(it != bound_factors.end(), "no bound cpu-bitmap factor ", handle,
              " (unbound, or bound in another process)");
  return it->second;
}

// A layer's bound operands: a factor pair, R then L, or (handle 0 for R) one pruned
// matrix L. The fused block ops take either kind for each projection.
struct BoundPair {
  std::shared_ptr<const Bound> r, l;  // r empty: one matrix
  int64_t cols() const { return r ? r->f.cols : l->f.cols; }
  int64_t rows() const { return l->f.rows; }
  // L (R x), or L x, for x (n, cols())
  at::Tensor apply(const at::Tensor& x) const {
    return spmm(r ? spmm(x, r->f, r->plan) : x, l->f, l->plan);
  }
};

BoundPair bound_pair(int64_t right, int64_t left, const char* op) {
  BoundPair p{right == 0 ? nullptr : bound_factor(right), bound_factor(left)};
  TORCH_CHECK(!p.r || p.l->f.cols == p.r->f.rows, op, ": the left factor takes ", p.l->f.cols,
              " columns; the right one gives ", p.r ? p.r->f.rows : 0);
  return p;
}

// bitmap_pair on bound factors for x (..., in) -> (..., rows), the leading dimensions
// flattened here rather than by two reshapes in Python; ``rows`` = the left factor's rows
// (the output width, which the op's fake implementation needs without the registry).
at::Tensor bitmap_pair_bound(const at::Tensor& x, int64_t right, int64_t left, int64_t rows) {
  const BoundPair p = bound_pair(right, left, "bitmap_pair_bound");
  TORCH_CHECK(p.rows() == rows, "the left factor has ", p.rows(), " rows, not ", rows);
  TORCH_CHECK(x.dim() >= 1, "x must have at least one dimension");
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = rows;
  return p.apply(x.reshape({-1, x.size(-1)})).view(shape);
}

// RMSNorm of each row of x (n, hidden) fp32 in transformers' order: weight * (x * rsqrt(mean(x^2) + eps)).
at::Tensor rms_norm_rows(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t n = x.size(0), hidden = x.size(1);
  at::Tensor h = at::empty_like(x);
  const at::Tensor w = weight.contiguous();
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  for (int64_t b = 0; b < n; ++b) {
    const float* xr = xp + b * hidden;
    float ss = 0.f;
    for (int64_t c = 0; c < hidden; ++c) ss += xr[c] * xr[c];
    const float inv = 1.f / std::sqrt(ss / float(hidden) + float(eps));
    for (int64_t c = 0; c < hidden; ++c) hp[b * hidden + c] = wp[c] * (xr[c] * inv);
  }
  return h;
}

// pos (n positions, int64) as a contiguous tensor, each checked to lie in [0, max_len):
// the caches' slot positions the decode-step ops write or read.
at::Tensor checked_positions(const at::Tensor& pos, int64_t n, int64_t max_len, const char* op) {
  TORCH_CHECK(pos.scalar_type() == at::kLong && pos.numel() == n, op, ": pos holds ", n, " int64 positions");
  at::Tensor pc = pos.contiguous();
  const int64_t* pp = pc.data_ptr<int64_t>();
  for (int64_t b = 0; b < n; ++b)
    TORCH_CHECK(pp[b] >= 0 && pp[b] < max_len, op, ": position ", pp[b], " outside the cache's ", max_len);
  return pc;
}

std::array<BoundPair, 3> bound_three(at::IntArrayRef handles, const char* op) {
  TORCH_CHECK(handles.size() == 6, op, " takes 6 handles (three pairs: R or 0, then L), got ", handles.size());
  return {bound_pair(handles[0], handles[1], op), bound_pair(handles[2], handles[3], op),
          bound_pair(handles[4], handles[5], op)};
}

// A LLaMA MLP block on bound factor pairs, x + down(silu(gate(h)) * up(h)) with
// h = weight * (x * rsqrt(mean(x^2) + eps)) (RMSNorm in transformers' order), fp32 x
// (..., hidden); ``handles`` = [gate R, gate L, up R, up L, down R, down L]. One op instead
// of the ten the Python block makes (norm, three layers, activation, product, residual),
// whose dispatch costs more than their work at decode batches.
at::Tensor mlp_block_bound(const at::Tensor& x, const at::Tensor& weight, double eps, at::IntArrayRef handles) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && x.device().is_cpu() &&
                  weight.device().is_cpu(),
              "mlp_block_bound takes fp32 CPU tensors");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && x.size(-1) == weight.size(0), "mlp_block_bound: x (..., ",
              weight.size(0), ") for a norm weight of ", weight.size(0), ", got ", x.sizes());
  const auto f = bound_three(handles, "mlp_block_bound");
  const int64_t hidden = weight.size(0);
  TORCH_CHECK(f[0].cols() == hidden && f[1].cols() == hidden && f[0].rows() == f[1].rows() &&
                  f[2].cols() == f[0].rows() && f[2].rows() == hidden,
              "mlp_block_bound: gate and up map ", hidden, " features to the width down takes, down back to ", hidden);
  const at::Tensor xc = x.reshape({-1, hidden}).contiguous();
  const at::Tensor h = rms_norm_rows(xc, weight, eps);
  at::Tensor g = f[0].apply(h);  // (n, inter)
  const at::Tensor u = f[1].apply(h);
  float* gp = g.data_ptr<float>();
  const float* up = u.data_ptr<float>();
  for (int64_t i = 0, e = g.numel(); i < e; ++i) gp[i] = gp[i] / (1.f + std::exp(-gp[i])) * up[i];
  at::Tensor y = f[2].apply(g);  // (n, hidden)
  y.add_(xc);
  return y.view(x.sizes());
}

// A decode step's attention inputs for one layer on bound factor pairs: h = RMSNorm(x),
// q, k, v = the q/k/v projections of h, rotary embedding on q and k (transformers' half
// rotation: x * cos + rotate_half(x) * sin), k and v written into the layer's caches
// (slots, kv_heads, max_len, head_dim) at row b's slot b and position pos[b]; returns q
// (n, heads, 1, head_dim). x (n, 1, hidden) fp32; cos and sin (n, 1, head_dim); handles
// = [q R, q L, k R, k L, v R, v L]. One op instead of the ~25 calls of the Python path.
at::Tensor attn_inputs_bound(const at::Tensor& x, const at::Tensor& weight, double eps, at::IntArrayRef handles,
                             const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache,
                             const at::Tensor& pos, int64_t heads, int64_t kv_heads) {
  const auto f = bound_three(handles, "attn_inputs_bound");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&x, &weight, &cos, &sin, &k_cache, &v_cache})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), "attn_inputs_bound takes fp32 CPU tensors");
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1 && weight.dim() == 1 && x.size(2) == weight.size(0),
              "attn_inputs_bound: x (n, 1, hidden) for a norm weight of ", weight.size(0), ", got ", x.sizes());
  const int64_t n = x.size(0), hidden = x.size(2);
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
                  v_cache.is_contiguous() && k_cache.size(1) == kv_heads && k_cache.size(0) >= n,
              "attn_inputs_bound: caches (slots >= ", n, ", ", kv_heads, ", max_len, head_dim), got ", k_cache.sizes());
  const int64_t max_len = k_cache.size(2), d = k_cache.size(3);
  TORCH_CHECK(d % 2 == 0 && cos.numel() == n * d && sin.numel() == n * d, "attn_inputs_bound: cos and sin (", n,
              ", 1, ", d, ")");
  TORCH_CHECK(f[0].cols() == hidden && f[1].cols() == hidden && f[2].cols() == hidden &&
                  f[0].rows() == heads * d && f[1].rows() == kv_heads * d && f[2].rows() == kv_heads * d,
              "attn_inputs_bound: q, k, v map ", hidden, " features to ", heads, " and ", kv_heads, " heads of ", d);
  const at::Tensor pc = checked_positions(pos, n, max_len, "attn_inputs_bound");
  const int64_t* pp = pc.data_ptr<int64_t>();
  const at::Tensor h = rms_norm_rows(x.reshape({n, hidden}).contiguous(), weight, eps);
  const at::Tensor q = f[0].apply(h);  // (n, heads * d)
  const at::Tensor k = f[1].apply(h);  // (n, kv_heads * d)
  const at::Tensor v = f[2].apply(h);
  const at::Tensor cc = cos.contiguous(), sc = sin.contiguous();
  const float *cp = cc.data_ptr<float>(), *sp = sc.data_ptr<float>();
  at::Tensor out = at::empty({n, heads, 1, d}, x.options());
  const int64_t half = d / 2;
  // dst[j] = src[j] * cos[j] + rotate_half(src)[j] * sin[j], rotate_half = (-second half, first half)
  auto rotate = [&](const float* src, float* dst, const float* c, const float* s) {
    for (int64_t j = 0; j < half; ++j) dst[j] = src[j] * c[j] + (-src[j + half]) * s[j];
    for (int64_t j = half; j < d; ++j) dst[j] = src[j] * c[j] + src[j - half] * s[j];
  };
  float *op = out.data_ptr<float>(), *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>();
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  for (int64_t b = 0; b < n; ++b) {
    const float *c = cp + b * d, *s = sp + b * d;
    for (int64_t hh = 0; hh < heads; ++hh) rotate(qp + (b * heads + hh) * d, op + (b * heads + hh) * d, c, s);
    for (int64_t hh = 0; hh < kv_heads; ++hh) {
      const int64_t at_cache = ((b * kv_heads + hh) * max_len + pp[b]) * d;
      rotate(kp + (b * kv_heads + hh) * d, kc + at_cache, c, s);
      std::memcpy(vc + at_cache, vp + (b * kv_heads + hh) * d, size_t(d) * sizeof(float));
    }
  }
  return out;
}

// Query-head positions (heads x span x head_dim products) from which attend_cached splits
// its heads over threads: below it a parallel region's start costs more than it saves.
constexpr int64_t kAttendParallelWork = 32768;

// Attention of one query per row over the cached keys and values: row b (slot b) attends
// positions 0..pos[b]; q (n, heads, 1, d), caches (slots, kv_heads, max_len, d), query
// head h reading kv head h / (heads / kv_heads). Returns (n, heads * d), fp32 softmax.
at::Tensor attend_cached(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const int64_t* pos, int64_t heads, int64_t kv_heads, double scale,
                         AttendFn attend = kTable.attend) {
  const int64_t n = q.size(0), max_len = k_cache.size(2), d = k_cache.size(3), group = heads / kv_heads;
  at::Tensor out = at::empty({n, heads * d}, q.options());
  const float *qp = q.data_ptr<float>(), *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  int64_t work = 0;
  for (int64_t b = 0; b < n; ++b) work += heads * (pos[b] + 1) * d;
#pragma omp parallel for schedule(static) if (work > kAttendParallelWork)
  for (int64_t task = 0; task < n * heads; ++task) {
    const int64_t b = task / heads, hh = task % heads, span = pos[b] + 1;
    const int64_t at = (b * kv_heads + hh / group) * max_len * d;
    std::vector<float> w(static_cast<size_t>(span));
    attend(qp + task * d, kc + at, vc + at, span, d, float(scale), w.data(), op + task * d);
  }
  return out;
}

// attend_cached as an op, for tests and callers outside the fused layer: q (n, heads, 1,
// d), caches (slots >= n, kv_heads, max_len, d), pos (n) int64, all checked; ``portable``
// runs the portable path instead of this CPU's own.
at::Tensor attend_cached_op(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& pos, int64_t heads, int64_t kv_heads, double scale, bool portable) {
  for (const at::Tensor* t : {&q, &k_cache, &v_cache})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu() && t->is_contiguous(),
                "attend_cached takes contiguous fp32 CPU tensors");
  TORCH_CHECK(kv_heads > 0 && heads > 0 && heads % kv_heads == 0, "attend_cached: ", heads, " heads over ", kv_heads,
              " kv heads");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && k_cache.size(1) == kv_heads,
              "attend_cached: caches (slots, ", kv_heads, ", max_len, head_dim), got ", k_cache.sizes(), " and ",
              v_cache.sizes());
  const int64_t n = q.size(0), max_len = k_cache.size(2), d = k_cache.size(3);
  TORCH_CHECK(q.dim() == 4 && q.size(1) == heads && q.size(2) == 1 && q.size(3) == d && k_cache.size(0) >= n,
              "attend_cached: q (n <= slots, ", heads, ", 1, ", d, "), got ", q.sizes());
  const at::Tensor pc = checked_positions(pos, n, max_len, "attend_cached");
  return attend_cached(q, k_cache, v_cache, pc.data_ptr<int64_t>(), heads, kv_heads, scale,
                       portable ? attend_portable : kTable.attend);
}

// A whole decoder layer's decode step on bound factors: attn_inputs_bound, attention over
// the cache, o_proj and the residual, then mlp_block_bound. ``handles`` = the q, k, v, o
// pairs then gate, up, down (R then L each, 14 in all). One op per layer and token.
at::Tensor decode_layer_bound(const at::Tensor& x, const at::Tensor& attn_norm, double attn_eps,
                              const at::Tensor& mlp_norm, double mlp_eps, at::IntArrayRef handles,
                              const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache,
                              const at::Tensor& pos, int64_t heads, int64_t kv_heads, double scale) {
  TORCH_CHECK(handles.size() == 14, "decode_layer_bound takes 14 handles (q, k, v, o, gate, up, down), got ",
              handles.size());
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "decode_layer_bound: ", heads, " heads over ", kv_heads,
              " kv heads");
  const at::Tensor q = attn_inputs_bound(x, attn_norm, attn_eps, handles.slice(0, 6), cos, sin, k_cache, v_cache, pos,
                                         heads, kv_heads);
  const at::Tensor pc = pos.contiguous();
  const at::Tensor a = attend_cached(q, k_cache, v_cache, pc.data_ptr<int64_t>(), heads, kv_heads, scale);
  const BoundPair o = bound_pair(handles[6], handles[7], "decode_layer_bound");
  TORCH_CHECK(o.cols() == a.size(1) && o.rows() == x.size(2), "decode_layer_bound: o_proj maps ", a.size(1),
              " features to ", x.size(2));
  at::Tensor h = o.apply(a);  // (n, hidden)
  h.add_(x.reshape({x.size(0), x.size(2)}));
  return mlp_block_bound(h.view(x.sizes()), mlp_norm, mlp_eps, handles.slice(8, 6));
}

// The path (and instruction family) bitmap_spmm takes for n rows of x in ``dtype``, e.g.
// "words avx2", "nonzeros avx512", "columns avx2", "dot avx512-256": what benchmarks print.
std::string bitmap_path(int64_t n, at::ScalarType dtype, const std::vector<at::Tensor>& factor, int64_t cols,
                        at::IntArrayRef plan_codes) {
  const Factor f = unpack_factor(factor, cols);
  const Plan plan = unpack_plan(plan_codes);
  switch (choose_path(n, dtype, f, plan)) {
    case Path::kColumns: return "columns avx2";
    case Path::kTiles: return plan.tiles == 3 ? std::string("pairs avx512-bf16") : std::string("tiles ") + kTileNames[plan.tiles];
    case Path::kNonzeros: return std::string("nonzeros ") + kNzNames[plan.nz];
    case Path::kDot: return std::string("dot ") + kWordNames[plan.dot];
    default: return std::string("words ") + kWordNames[plan.word];
  }
}

void check_structure_args(const at::Tensor& bitmap, const at::Tensor& offsets, int64_t cols) {
  TORCH_CHECK(bitmap.dim() == 2 && bitmap.scalar_type() == at::kInt && bitmap.is_contiguous() &&
                  bitmap.device().is_cpu(),
              "bitmap must be a contiguous 2-D int32 CPU tensor");
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kInt && offsets.is_contiguous() &&
                  offsets.numel() == bitmap.size(0) + 1,
              "row_offsets must be ", bitmap.size(0) + 1, " contiguous int32 values");
  TORCH_CHECK(cols >= 0 && bitmap.size(1) * 32 >= cols, "a factor with ", cols, " columns needs ", (cols + 31) / 32,
              " bitmap words per row, got ", bitmap.size(1));
}

int64_t bitmap_check(const at::Tensor& bitmap, const at::Tensor& offsets, int64_t cols, int64_t nnz) {
  check_structure_args(bitmap, offsets, cols);
  return check_factor(bitmap.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(), bitmap.size(0), bitmap.size(1), cols,
                      nnz);
}

at::Tensor bitmap_columns(const at::Tensor& bitmap, const at::Tensor& offsets, int64_t cols) {
  check_structure_args(bitmap, offsets, cols);
  const int64_t rows = bitmap.size(0), nnz = offsets.data_ptr<int32_t>()[rows];
  TORCH_CHECK(nnz >= 0, "row_offsets end at a negative count ", nnz);
  at::Tensor columns = at::empty({nnz}, bitmap.options().dtype(at::kShort));
  TORCH_CHECK(index_columns(bitmap.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(), rows, bitmap.size(1), cols, nnz,
                            reinterpret_cast<uint16_t*>(columns.data_ptr<int16_t>())),
              "cannot index the columns of a ", rows, "x", cols,
              " bitmap factor: its bits do not match its row offsets or columns (or it has over 65536 columns)");
  return columns;
}

std::tuple<std::vector<std::string>, std::vector<double>> plan_paths() {
  std::vector<std::string> names;
  std::vector<double> ns;
  for (const auto& [name, t] : time_paths()) {
    names.emplace_back(name);
    ns.push_back(t);
  }
  return {names, ns};
}

std::vector<std::string> cpu_paths() { return kTable.names; }

// Why this machine has no AMX tile path ("" where it has one).
std::string amx_reason() {
#ifdef DSF_X86
  const char* reason = amx_unavailable();
  return reason ? reason : "";
#else
  return "the CPU has no AMX (not an x86 CPU)";  // the same start as amx.cpp's no-hardware reason
#endif
}

// y = x W^T (no bias) for x (n, k) and W (rows, k): the AVX2 dense path where the CPU has
// it and x is fp32, else ATen's linear. For the dense layers a sparse model keeps (the
// output layer), whose tall shape BLAS libraries run single-threaded at a fraction of the
// bandwidth. W is fp32, bf16, or int8 with ``scales`` (rows, k / 32) fp32, one per 32
// columns (W = int8 value * its block's scale); fp32 x with a narrow W computes in fp32.
at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scales) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "dense_linear takes CPU tensors");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "dense_linear: x (n, k) and weight (rows, k), got ",
              x.sizes(), " and ", weight.sizes());
  const int64_t n = x.size(0), rows = weight.size(0), k = weight.size(1);
  const bool q8 = weight.scalar_type() == at::kChar;
  TORCH_CHECK(q8 == scales.has_value(), "dense_linear: an int8 weight needs scales, and only an int8 weight takes them");
  if (q8) {
    TORCH_CHECK(k % kDenseQ8Block == 0, "dense_linear: an int8 weight's columns must be a multiple of ", kDenseQ8Block,
                ", got ", k);
    TORCH_CHECK(scales->device().is_cpu() && scales->scalar_type() == at::kFloat && scales->dim() == 2 &&
                    scales->size(0) == rows && scales->size(1) == k / kDenseQ8Block,
                "dense_linear: scales must be fp32 (rows, k / ", kDenseQ8Block, ") = (", rows, ", ", k / kDenseQ8Block,
                "), got ", scales->scalar_type(), " ", scales->sizes());
    TORCH_CHECK(x.scalar_type() == at::kFloat, "dense_linear: an int8 weight takes fp32 x, got ", x.scalar_type());
  }
  const bool narrow_ok = weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16 || q8;
  if (!kTable.dense || x.scalar_type() != at::kFloat || !narrow_ok) {
    if (q8) {  // W as fp32, the same products the kernel forms
      const at::Tensor w = (weight.to(at::kFloat).view({rows, k / kDenseQ8Block, kDenseQ8Block}) * scales->unsqueeze(2));
      return at::linear(x, w.view({rows, k}));
    }
    return at::linear(x, weight.scalar_type() == x.scalar_type() ? weight : weight.to(x.scalar_type()));
  }
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const at::Tensor sc = q8 ? scales->contiguous() : at::Tensor();
  at::Tensor y = at::empty({n, rows}, x.options());
  if (n > 0 && rows > 0) {
    if (k == 0) return y.zero_();
    const int kind = q8 ? kDenseQ8 : weight.scalar_type() == at::kBFloat16 ? kDenseBf16 : kDenseF32;
    const DenseWeight w{wc.data_ptr(), q8 ? sc.data_ptr<float>() : nullptr, kind};
    kTable.dense(w, rows, k, xc.data_ptr<float>(), k, y.data_ptr<float>(), rows, n);
  }
  return y;
}

}  // namespace
}  // namespace dsf

DSF_LIBRARY(DSF_OP_NAMESPACE, m) {
  m.def("bitmap_spmm(Tensor x, Tensor[] factor, int cols, int[] plan) -> Tensor");
  m.def(
      "bitmap_pair(Tensor x, Tensor[] right, int right_cols, int[] right_plan, Tensor[] left, int left_cols, "
      "int[] left_plan) -> Tensor");
  m.def("bitmap_check(Tensor bitmap, Tensor row_offsets, int cols, int nnz) -> int");
  m.def("bitmap_bind(Tensor[] factor, int cols, int[] plan) -> int", &dsf::bitmap_bind);
  m.def("bitmap_unbind(int handle) -> ()", &dsf::bitmap_unbind);
  m.def("bitmap_pair_bound(Tensor x, int right, int left, int rows) -> Tensor");
  m.def("mlp_block_bound(Tensor x, Tensor norm_weight, float eps, int[] handles) -> Tensor");
  m.def(
      "decode_layer_bound(Tensor x, Tensor attn_norm, float attn_eps, Tensor mlp_norm, float mlp_eps, int[] handles, "
      "Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor pos, int heads, int kv_heads, "
      "float scale) -> Tensor");
  m.def(
      "attn_inputs_bound(Tensor x, Tensor norm_weight, float eps, int[] handles, Tensor cos, Tensor sin, "
      "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor pos, int heads, int kv_heads) -> Tensor");
  m.def(
      "attend_cached(Tensor q, Tensor k_cache, Tensor v_cache, Tensor pos, int heads, int kv_heads, float scale, "
      "bool portable=False) -> Tensor");
  m.def("bitmap_path(int n, ScalarType dtype, Tensor[] factor, int cols, int[] plan) -> str", &dsf::bitmap_path);
  m.def("bitmap_columns(Tensor bitmap, Tensor row_offsets, int cols) -> Tensor");
  m.def("plan_paths() -> (str[], float[])", &dsf::plan_paths);
  m.def("cpu_paths() -> str[]", &dsf::cpu_paths);
  m.def("amx_reason() -> str", &dsf::amx_reason);
  m.def("dense_linear(Tensor x, Tensor weight, Tensor? scales=None) -> Tensor");
}

DSF_LIBRARY_IMPL(DSF_OP_NAMESPACE, CPU, m) {
  m.impl("bitmap_spmm", &dsf::bitmap_spmm);
  m.impl("bitmap_pair", &dsf::bitmap_pair);
  m.impl("bitmap_pair_bound", &dsf::bitmap_pair_bound);
  m.impl("mlp_block_bound", &dsf::mlp_block_bound);
  m.impl("decode_layer_bound", &dsf::decode_layer_bound);
  m.impl("attn_inputs_bound", &dsf::attn_inputs_bound);
  m.impl("attend_cached", &dsf::attend_cached_op);
  m.impl("bitmap_check", &dsf::bitmap_check);
  m.impl("bitmap_columns", &dsf::bitmap_columns);
  m.impl("dense_linear", &dsf::dense_linear);
}
