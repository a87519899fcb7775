// The one place where tensors meet the CPU kernels: checks inputs, picks the kernel for the dtype,
// allocates outputs, and exposes them as functions of perceiver_fast._C.
#include <ATen/ATen.h>
#include <torch/extension.h>

#include "cpu/attention.h"
#include "cpu/dropout.h"
#include "cpu/input_attention.h"
#include "cpu/parallel.h"
#include "cpu/phase_timer.h"
#include "cpu/softmax_rows_avx512.h"
#include "cpu/tile_gemm.h"
#include "cpu/vector_paths.h"

namespace perceiver_fast {
namespace {

void check_operand(const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D (B, H, rows, dim), got ", t.dim(), "-D");
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, " must have q's dtype ", q.scalar_type(), ", got ",
              t.scalar_type());
}

// Every kernel operand needs a contiguous last dimension; other strides are free.
at::Tensor with_unit_last_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

template <typename T>
cpu::Strided<const T> strided(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

// The bool (B, M) key mask, contiguous; undefined when there is none.
at::Tensor checked_key_mask(const std::optional<at::Tensor>& key_mask, int64_t B, int64_t M) {
  if (!key_mask.has_value()) return {};
  const auto& mask = *key_mask;
  TORCH_CHECK(mask.scalar_type() == at::kBool, "key_mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == B && mask.size(1) == M, "key_mask must be (B, M) = (", B, ", ", M,
              "), got ", mask.sizes());
  TORCH_CHECK(mask.device().is_cpu(), "key_mask must be on the CPU, got ", mask.device());
  return mask.contiguous();
}

// dout, out and lse of a backward call, checked against the forward's shape: (dout with a unit
// last stride, out and lse contiguous).
std::tuple<at::Tensor, at::Tensor, at::Tensor> checked_backward_operands(const at::Tensor& dout, const at::Tensor& out,
                                                                         const at::Tensor& lse, const at::Tensor& q,
                                                                         const cpu::Shape& s) {
  check_operand("dout", dout, q);
  check_operand("out", out, q);
  TORCH_CHECK(dout.sizes() == out.sizes() && out.sizes() == at::IntArrayRef({s.batch, s.heads, s.queries, s.dim_v}),
              "dout and out must be (B, H, N, Dv) = (", s.batch, ", ", s.heads, ", ", s.queries, ", ", s.dim_v,
              "), got ", dout.sizes(), " and ", out.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.sizes() == at::IntArrayRef({s.batch, s.heads, s.queries}),
              "lse must be float32 (B, H, N), got ", lse.scalar_type(), " ", lse.sizes());
  return {with_unit_last_stride(dout), out.contiguous(), lse.contiguous()};
}

// Dropout of a call: dropout_p in [0, 1); with p > 0 the seed tensor (int64 seed, offset) the
// Python side drew; row_offset: the problem row of q's row 0 (calls on a chunk of the rows).
cpu::Dropout checked_dropout(double p, const std::optional<at::Tensor>& seed, int64_t row_offset) {
  TORCH_CHECK(p >= 0 && p < 1, "dropout_p must be in [0, 1), got ", p);
  TORCH_CHECK(row_offset >= 0, "row_offset must be >= 0, got ", row_offset);
  if (p == 0) return {};
  TORCH_CHECK(seed.has_value(), "dropout_seed must be given with dropout_p > 0");
  TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 2 && seed->device().is_cpu(),
              "dropout_seed must be an int64 CPU tensor of 2 values (seed, offset), got ", seed->scalar_type(), " ",
              seed->sizes(), " on ", seed->device());
  const at::Tensor words = seed->contiguous();
  const int64_t* w = words.data_ptr<int64_t>();
  // As perceiver_fast.dropout.keep_threshold: p * 2^32 is exact in a double; truncate, cap at 2^32 - 1.
  const auto threshold =
      static_cast<uint32_t>(std::min<uint64_t>(static_cast<uint64_t>(p * 4294967296.0), 0xFFFFFFFFull));
  return {p, static_cast<uint64_t>(w[0]), static_cast<uint32_t>(w[1]), threshold, row_offset};
}

// split_bf16: float32 inputs multiplied as split bfloat16 (cpu/tile_gemm.h, SplitBF16).
void check_split_bf16(bool split_bf16, const at::Tensor& q) {
  TORCH_CHECK(!split_bf16 || q.scalar_type() == at::kFloat, "split_bf16 needs float32 inputs, got ",
              q.scalar_type());
}

struct Checked {
  at::Tensor q, k, v, key_mask;
  cpu::Shape shape;
};

Checked check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& key_mask) {
  check_operand("q", q, q);
  check_operand("k", k, q);
  check_operand("v", v, q);
  const auto type = q.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kDouble || type == at::kBFloat16,
              "q, k, v must be float32, float64 or bfloat16 for the cpu backend, got ", type);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), M = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == q.size(3), "k must be (B, H, M, Dqk) = (", B, ", ", H,
              ", M, ", q.size(3), "), got ", k.sizes());
  TORCH_CHECK(v.size(0) == B && v.size(1) == H && v.size(2) == M, "v must be (B, H, M, Dv) = (", B, ", ", H, ", ", M,
              ", Dv), got ", v.sizes());
  TORCH_CHECK(N > 0 && M > 0 && q.size(3) > 0 && v.size(3) > 0, "q, k, v must have no empty dimension");
  Checked c{with_unit_last_stride(q), with_unit_last_stride(k), with_unit_last_stride(v), at::Tensor(),
            {B, H, N, M, q.size(3), v.size(3)}};
  c.key_mask = checked_key_mask(key_mask, B, M);
  return c;
}

// bfloat16 inputs are multiplied as bfloat16 only where the CPU has bfloat16 dot products (the
// brgemm's VNNI layout); elsewhere their tiles are widened to float32 as they are packed, which
// beats at::mm's per-tile conversions and keeps the probabilities in float32.
bool widen_bf16(const at::Tensor& q) {
  return q.scalar_type() == at::kBFloat16 && !cpu::TileGemm<c10::BFloat16>::vnni();
}

template <typename T>
cpu::AttentionInputs<T> kernel_inputs(const Checked& c, bool causal, double scale, int64_t key_tile,
                                      int64_t row_block, int64_t workers, const cpu::Dropout& dropout) {
  TORCH_CHECK(key_tile >= 0 && row_block >= 0 && workers >= 0, "key_tile, row_block and workers must be >= 0");
  return {c.shape,
          strided<T>(c.q),
          strided<T>(c.k),
          strided<T>(c.v),
          c.key_mask.defined() ? c.key_mask.data_ptr<bool>() : nullptr,
          causal,
          scale,
          {key_tile, row_block, workers},
          dropout};
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const std::optional<at::Tensor>& key_mask, bool causal, double scale,
                                           int64_t key_tile, int64_t row_block, int64_t workers, double dropout_p,
                                           const std::optional<at::Tensor>& dropout_seed, int64_t row_offset,
                                           bool split_bf16) {
  const Checked c = check_inputs(q, k, v, key_mask);
  const cpu::Dropout dropout = checked_dropout(dropout_p, dropout_seed, row_offset);
  check_split_bf16(split_bf16, q);
  const auto& s = c.shape;
  auto out = at::empty({s.batch, s.heads, s.queries, s.dim_v}, q.options());
  auto lse = at::empty({s.batch, s.heads, s.queries}, q.options().dtype(at::kFloat));
  if (split_bf16) {
    cpu::attention_forward<float, cpu::SplitBF16>(
        kernel_inputs<float>(c, causal, scale, key_tile, row_block, workers, dropout), out.data_ptr<float>(),
        lse.data_ptr<float>());
    return {out, lse};
  }
  if (widen_bf16(q)) {
    cpu::attention_forward<c10::BFloat16, float>(
        kernel_inputs<c10::BFloat16>(c, causal, scale, key_tile, row_block, workers, dropout),
        out.data_ptr<c10::BFloat16>(), lse.data_ptr<float>());
    return {out, lse};
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "cpu_attention_forward", [&] {
    cpu::attention_forward<scalar_t>(kernel_inputs<scalar_t>(c, causal, scale, key_tile, row_block, workers, dropout),
                                     out.data_ptr<scalar_t>(), lse.data_ptr<float>());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& dout, const at::Tensor& q,
                                                        const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& out, const at::Tensor& lse,
                                                        const std::optional<at::Tensor>& key_mask, bool causal,
                                                        double scale, int64_t key_tile, int64_t row_block,
                                                        int64_t workers, double dropout_p,
                                                        const std::optional<at::Tensor>& dropout_seed,
                                                        int64_t row_offset, bool split_bf16) {
  const Checked c = check_inputs(q, k, v, key_mask);
  const cpu::Dropout dropout = checked_dropout(dropout_p, dropout_seed, row_offset);
  check_split_bf16(split_bf16, q);
  const auto& s = c.shape;
  // Plain references, not structured bindings: the dispatch lambdas below capture them (C++17).
  const auto operands = checked_backward_operands(dout, out, lse, q, s);
  const at::Tensor &dout_c = std::get<0>(operands), &out_c = std::get<1>(operands), &lse_c = std::get<2>(operands);
  auto dq = at::empty({s.batch, s.heads, s.queries, s.dim_qk}, q.options());
  auto dk = at::empty({s.batch, s.heads, s.keys, s.dim_qk}, q.options());
  auto dv = at::empty({s.batch, s.heads, s.keys, s.dim_v}, q.options());
  if (split_bf16) {
    cpu::attention_backward<float, cpu::SplitBF16>(
        kernel_inputs<float>(c, causal, scale, key_tile, row_block, workers, dropout), strided<float>(dout_c),
        out_c.data_ptr<float>(), lse_c.data_ptr<float>(), dq.data_ptr<float>(), dk.data_ptr<float>(),
        dv.data_ptr<float>());
    return {dq, dk, dv};
  }
  if (widen_bf16(q)) {
    cpu::attention_backward<c10::BFloat16, float>(
        kernel_inputs<c10::BFloat16>(c, causal, scale, key_tile, row_block, workers, dropout),
        strided<c10::BFloat16>(dout_c), out_c.data_ptr<c10::BFloat16>(), lse_c.data_ptr<float>(),
        dq.data_ptr<c10::BFloat16>(), dk.data_ptr<c10::BFloat16>(), dv.data_ptr<c10::BFloat16>());
    return {dq, dk, dv};
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "cpu_attention_backward", [&] {
    cpu::attention_backward<scalar_t>(kernel_inputs<scalar_t>(c, causal, scale, key_tile, row_block, workers, dropout),
                                      strided<scalar_t>(dout_c), out_c.data_ptr<scalar_t>(), lse_c.data_ptr<float>(),
                                      dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>());
  });
  return {dq, dk, dv};
}


// ---------------------------------------------------------------------------------------------
// Fused input attention (csrc/cpu/input_attention.h)

struct CheckedInput {
  at::Tensor q, x, k_weight, k_bias, v_weight, v_bias, key_mask;
  cpu::Shape shape;
};

at::Tensor checked_weight(const char* name, const std::optional<at::Tensor>& t, const at::Tensor& q,
                          at::IntArrayRef shape) {
  TORCH_CHECK(t.has_value(), name, " must be given with k_weight (the projection path)");
  TORCH_CHECK(t->scalar_type() == q.scalar_type(), name, " must have q's dtype ", q.scalar_type(), ", got ",
              t->scalar_type());
  TORCH_CHECK(t->device().is_cpu(), name, " must be on the CPU, got ", t->device());
  TORCH_CHECK(t->sizes() == shape, name, " must have shape ", shape, ", got ", t->sizes());
  return t->contiguous();
}

CheckedInput check_input_attention(const at::Tensor& q, const at::Tensor& x, const std::optional<at::Tensor>& k_weight,
                                   const std::optional<at::Tensor>& k_bias, const std::optional<at::Tensor>& v_weight,
                                   const std::optional<at::Tensor>& v_bias, const std::optional<at::Tensor>& key_mask) {
  check_operand("q", q, q);
  const auto type = q.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kDouble || type == at::kBFloat16,
              "q and x must be float32, float64 or bfloat16 for the cpu backend, got ", type);
  TORCH_CHECK(x.dim() == 3, "x must be 3-D (B, M, C), got ", x.dim(), "-D");
  TORCH_CHECK(x.device().is_cpu(), "x must be on the CPU, got ", x.device());
  TORCH_CHECK(x.scalar_type() == type, "x must have q's dtype ", type, ", got ", x.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), M = x.size(1), C = x.size(2);
  TORCH_CHECK(x.size(0) == B, "x must have q's batch size ", B, ", got ", x.sizes());
  TORCH_CHECK(N > 0 && M > 0 && C > 0 && q.size(3) > 0, "q and x must have no empty dimension");
  CheckedInput c{with_unit_last_stride(q), with_unit_last_stride(x)};
  if (k_weight.has_value()) {
    const int64_t dqk = q.size(3);
    TORCH_CHECK(v_weight.has_value() && v_weight->dim() == 2 && v_weight->size(0) % H == 0,
                "v_weight must be given with k_weight, of shape (H * Dv, C) with H = ", H);
    const int64_t dv = v_weight->size(0) / H;
    c.k_weight = checked_weight("k_weight", k_weight, q, {H * dqk, C});
    c.k_bias = checked_weight("k_bias", k_bias, q, {H * dqk});
    c.v_weight = checked_weight("v_weight", v_weight, q, {H * dv, C});
    c.v_bias = checked_weight("v_bias", v_bias, q, {H * dv});
    c.shape = {B, H, N, M, dqk, dv};
  } else {
    TORCH_CHECK(!k_bias.has_value() && !v_weight.has_value() && !v_bias.has_value(),
                "without k_weight (the shortcut) k_bias, v_weight and v_bias must be None");
    TORCH_CHECK(q.size(3) == C, "without k_weight (the shortcut) q's last dimension must be x's C = ", C, ", got ",
                q.size(3));
    c.shape = {B, H, N, M, C, C};
  }
  c.key_mask = checked_key_mask(key_mask, B, M);
  return c;
}

template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <typename T>
cpu::InputAttentionInputs<T> input_kernel_inputs(const CheckedInput& c, bool normalize, double eps, bool causal,
                                                 double scale, int64_t key_tile, int64_t row_block, int64_t workers,
                                                 const cpu::Dropout& dropout) {
  TORCH_CHECK(key_tile >= 0 && row_block >= 0 && workers >= 0, "key_tile, row_block and workers must be >= 0");
  TORCH_CHECK(eps >= 0, "eps must be >= 0, got ", eps);
  return {c.shape,
          strided<T>(c.q),
          c.x.data_ptr<T>(),
          c.x.stride(0),
          c.x.stride(1),
          c.x.size(2),
          normalize,
          eps,
          data_or_null<T>(c.k_weight),
          data_or_null<T>(c.k_bias),
          data_or_null<T>(c.v_weight),
          data_or_null<T>(c.v_bias),
          c.key_mask.defined() ? c.key_mask.data_ptr<bool>() : nullptr,
          causal,
          scale,
          {key_tile, row_block, workers},
          dropout};
}

std::tuple<at::Tensor, at::Tensor> input_forward(const at::Tensor& q, const at::Tensor& x, bool normalize, double eps,
                                                 const std::optional<at::Tensor>& k_weight,
                                                 const std::optional<at::Tensor>& k_bias,
                                                 const std::optional<at::Tensor>& v_weight,
                                                 const std::optional<at::Tensor>& v_bias,
                                                 const std::optional<at::Tensor>& key_mask, bool causal, double scale,
                                                 int64_t key_tile, int64_t row_block, int64_t workers,
                                                 double dropout_p, const std::optional<at::Tensor>& dropout_seed,
                                                 int64_t row_offset) {
  const CheckedInput c = check_input_attention(q, x, k_weight, k_bias, v_weight, v_bias, key_mask);
  const cpu::Dropout dropout = checked_dropout(dropout_p, dropout_seed, row_offset);
  const auto& s = c.shape;
  auto out = at::empty({s.batch, s.heads, s.queries, s.dim_v}, q.options());
  auto lse = at::empty({s.batch, s.heads, s.queries}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "cpu_input_attention_forward", [&] {
    const auto inputs =
        input_kernel_inputs<scalar_t>(c, normalize, eps, causal, scale, key_tile, row_block, workers, dropout);
    cpu::input_attention_forward<scalar_t>(inputs, out.data_ptr<scalar_t>(), lse.data_ptr<float>());
  });
  return {out, lse};
}

// Returns dq, dx and, with the projection, dk_weight, dk_bias, dv_weight, dv_bias (empty tensors
// for the shortcut).
std::vector<at::Tensor> input_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& x, bool normalize,
                                       double eps, const std::optional<at::Tensor>& k_weight,
                                       const std::optional<at::Tensor>& k_bias,
                                       const std::optional<at::Tensor>& v_weight,
                                       const std::optional<at::Tensor>& v_bias, const at::Tensor& out,
                                       const at::Tensor& lse, const std::optional<at::Tensor>& key_mask, bool causal,
                                       double scale, int64_t key_tile, int64_t row_block, int64_t workers,
                                       double dropout_p, const std::optional<at::Tensor>& dropout_seed,
                                       int64_t row_offset) {
  const CheckedInput c = check_input_attention(q, x, k_weight, k_bias, v_weight, v_bias, key_mask);
  const cpu::Dropout dropout = checked_dropout(dropout_p, dropout_seed, row_offset);
  const auto& s = c.shape;
  // Plain references, not structured bindings: the dispatch lambdas below capture them (C++17).
  const auto operands = checked_backward_operands(dout, out, lse, q, s);
  const at::Tensor &dout_c = std::get<0>(operands), &out_c = std::get<1>(operands), &lse_c = std::get<2>(operands);
  auto dq = at::empty({s.batch, s.heads, s.queries, s.dim_qk}, q.options());
  auto dx = at::zeros(x.sizes(), x.options());
  at::Tensor dkw, dkb, dvw, dvb;
  if (c.k_weight.defined()) {
    dkw = at::empty_like(c.k_weight);
    dkb = at::empty_like(c.k_bias);
    dvw = at::empty_like(c.v_weight);
    dvb = at::empty_like(c.v_bias);
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "cpu_input_attention_backward", [&] {
    const auto inputs =
        input_kernel_inputs<scalar_t>(c, normalize, eps, causal, scale, key_tile, row_block, workers, dropout);
    cpu::input_attention_backward<scalar_t>(
        inputs, strided<scalar_t>(dout_c), out_c.data_ptr<scalar_t>(), lse_c.data_ptr<float>(),
        cpu::InputAttentionGrads<scalar_t>{dq.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), data_or_null<scalar_t>(dkw),
                                           data_or_null<scalar_t>(dkb), data_or_null<scalar_t>(dvw), data_or_null<scalar_t>(dvb)});
  });
  if (!dkw.defined()) {
    // Four distinct empty tensors: the outputs of a registered op may not alias each other.
    const auto none = [&] { return at::empty({0}, q.options()); };
    return {dq, dx, none(), none(), none(), none()};
  }
  return {dq, dx, dkw, dkb, dvw, dvb};
}

// The (B, H, N, M) keep mask the kernels draw from dropout_seed: the debug view of their dropout.
at::Tensor dropout_keep_mask(const at::Tensor& dropout_seed, int64_t batch, int64_t heads, int64_t queries,
                             int64_t keys, double dropout_p) {
  TORCH_CHECK(batch >= 0 && heads >= 0 && queries >= 0 && keys >= 0, "batch, heads, queries and keys must be >= 0");
  TORCH_CHECK(dropout_p > 0, "dropout_p must be in (0, 1) for a keep mask, got ", dropout_p);
  const cpu::Dropout dropout = checked_dropout(dropout_p, dropout_seed, 0);
  auto mask = at::empty({batch, heads, queries, keys}, at::TensorOptions().dtype(at::kBool));
  bool* data = mask.data_ptr<bool>();
  cpu::parallel_for(0, batch * heads * queries, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> words(cpu::keep_words(keys));
    for (int64_t r = begin; r < end; ++r) {
      cpu::dropout_keep_bits(dropout, r / queries, r % queries, 0, keys, words.data());
      for (int64_t j = 0; j < keys; ++j) data[r * keys + j] = (words[j / 64] >> (j % 64)) & 1;
    }
  });
  return mask;
}

}  // namespace
}  // namespace perceiver_fast

#ifdef PERCEIVER_FAST_CUDA
namespace perceiver_fast {
void add_cuda_functions(pybind11::module_& m);  // csrc/cuda_binding.cpp
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Plain functions, not torch ops: perceiver_fast/ops/ registers the library's ops with torch.library
  // and calls these from their device kernels.
  namespace py = pybind11;
  m.doc() = "perceiver-fast compiled kernels, called by the ops of perceiver_fast/ops/";
  m.def("cpu_attention_forward", &perceiver_fast::forward, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("key_mask"), py::arg("causal"), py::arg("scale"), py::arg("key_tile") = 0, py::arg("row_block") = 0,
        py::arg("workers") = 0, py::arg("dropout_p") = 0.0,
        py::arg("dropout_seed") = py::none(), py::arg("row_offset") = 0, py::arg("split_bf16") = false);
  m.def("cpu_attention_backward", &perceiver_fast::backward, py::arg("dout"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("key_mask"), py::arg("causal"), py::arg("scale"),
        py::arg("key_tile") = 0, py::arg("row_block") = 0, py::arg("workers") = 0, py::arg("dropout_p") = 0.0,
        py::arg("dropout_seed") = py::none(), py::arg("row_offset") = 0, py::arg("split_bf16") = false);
  m.def("cpu_input_attention_forward", &perceiver_fast::input_forward, py::arg("q"), py::arg("x"),
        py::arg("normalize"), py::arg("eps"), py::arg("k_weight"), py::arg("k_bias"), py::arg("v_weight"),
        py::arg("v_bias"), py::arg("key_mask"), py::arg("causal"), py::arg("scale"), py::arg("key_tile") = 0,
        py::arg("row_block") = 0, py::arg("workers") = 0, py::arg("dropout_p") = 0.0,
        py::arg("dropout_seed") = py::none(), py::arg("row_offset") = 0);
  m.def("cpu_input_attention_backward", &perceiver_fast::input_backward, py::arg("dout"), py::arg("q"), py::arg("x"),
        py::arg("normalize"), py::arg("eps"), py::arg("k_weight"), py::arg("k_bias"), py::arg("v_weight"),
        py::arg("v_bias"), py::arg("out"), py::arg("lse"), py::arg("key_mask"), py::arg("causal"), py::arg("scale"),
        py::arg("key_tile") = 0, py::arg("row_block") = 0, py::arg("workers") = 0, py::arg("dropout_p") = 0.0,
        py::arg("dropout_seed") = py::none(), py::arg("row_offset") = 0);
#ifdef PERCEIVER_FAST_CUDA
  perceiver_fast::add_cuda_functions(m);
#endif
  m.def("cpu_dropout_keep_mask", &perceiver_fast::dropout_keep_mask, py::arg("dropout_seed"), py::arg("batch"),
        py::arg("heads"), py::arg("queries"), py::arg("keys"), py::arg("dropout_p"));
  m.def("cpu_features", [] {
    namespace cpu = perceiver_fast::cpu;
    const auto& names = cpu::isa_names();
    py::dict features;
    features["isa"] = names[static_cast<int>(cpu::active_isa())];
    features["isa_detected"] = names[static_cast<int>(cpu::detected_isa())];
    features["isa_cap"] = cpu::isa_cap();
    features["isa_levels"] = names;
    features["simd_rows"] = cpu::use_simd_rows();
    features["avx512_rows"] = cpu::use_avx512_rows();
    features["avx512_softmax"] = cpu::use_avx512_bf16_rows();
    features["avx512_philox"] = cpu::use_avx512_philox();
    features["brgemm_float"] = cpu::TileGemm<float>::brgemm();
    features["brgemm_bf16_vnni"] = cpu::TileGemm<c10::BFloat16>::vnni();
    features["portable_gemm_forced"] = cpu::portable_gemm();
    return features;
  }, "The row code and GEMMs the cpu kernels run with: the instruction-set level in use (detected, capped by "
     "PERCEIVER_FAST_CPU_ISA or set_cpu_isa), and each path it enables.");
  m.def("set_phase_timing", &perceiver_fast::cpu::set_phase_timing,
        "Start (True) or stop timing the cpu attention kernels by phase (the benchmark engine's breakdown).");
  m.def("take_phase_seconds", [] {
    const auto taken = perceiver_fast::cpu::take_phase_nanoseconds();
    std::map<std::string, double> seconds;
    for (size_t p = 0; p < taken.size(); ++p) seconds[perceiver_fast::cpu::kPhaseNames[p]] = taken[p] * 1e-9;
    return seconds;
  }, "Seconds per phase of the cpu attention kernels, summed over threads, since the last call (then reset).");
  m.def("set_cpu_isa", &perceiver_fast::cpu::set_isa_cap, py::arg("name"),
        "Cap the instruction-set level of every path the cpu kernels pick (rows, softmax, packing, Philox, "
        "brgemm): one of cpu_features()['isa_levels'], or 'none'. perceiver_fast sets it from "
        "PERCEIVER_FAST_CPU_ISA at import; tests use it to run the paths other CPUs take.");
  m.def("set_portable_gemm", &perceiver_fast::cpu::set_portable_gemm,
        "Force the at::mm GEMM path instead of oneDNN brgemm (for tests of the path other CPUs take).");
}
