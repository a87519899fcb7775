// The CUDA backend's torch binding: checks inputs, allocates outputs and workspaces (the forward's
// splits; the backward's delta and fp32 dq), picks the forward's key-axis split count, and launches
// the kernels of csrc/cuda/ on the current stream.
// Built only where torch has CUDA (setup.py), which then defines PERCEIVER_FAST_CUDA so that
// binding.cpp adds this function to perceiver_fast._C.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <algorithm>
#include <optional>

#include "cuda/attention.cuh"

namespace perceiver_fast {
namespace {

void check_operand(const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D (B, H, rows, dim), got ", t.dim(), "-D");
  TORCH_CHECK(t.is_cuda() && t.device() == q.device(), name, " must be on q's CUDA device ", q.device(), ", got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, " must have q's dtype ", q.scalar_type(), ", got ",
              t.scalar_type());
}

at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// Enough blocks for two waves of the GPU: split the key axis when batch x heads x query blocks x
// value chunks fall short (batch 1, one head, 512 latents).
int choose_splits(int64_t blocks, int64_t key_tiles, int requested, int device) {
  if (requested > 0) return static_cast<int>(std::min<int64_t>(requested, key_tiles));
  int sms = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) == cudaSuccess,
              "cannot read the multiprocessor count of CUDA device ", device);
  if (blocks >= 2 * sms) return 1;
  return static_cast<int>(std::clamp<int64_t>((2 * int64_t{sms} + blocks - 1) / blocks, 1, key_tiles));
}

// q, k, v and the key mask of a call, checked, with unit last strides; shape (B, H, N, M, Dqk, Dv).
struct Checked {
  at::Tensor q, k, v, key_mask;
  int64_t B, H, N, M, dqk, dv;
};

Checked check_inputs(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                     const std::optional<at::Tensor>& key_mask) {
  TORCH_CHECK(q_in.is_cuda(), "q must be a CUDA tensor, got ", q_in.device());
  check_operand("q", q_in, q_in);
  check_operand("k", k_in, q_in);
  check_operand("v", v_in, q_in);
  const auto type = q_in.scalar_type();
  TORCH_CHECK(type == at::kHalf || type == at::kBFloat16, "the cuda backend takes float16 or bfloat16, got ", type);
  const int64_t B = q_in.size(0), H = q_in.size(1), N = q_in.size(2), M = k_in.size(2);
  const int64_t dqk = q_in.size(3), dv = v_in.size(3);
  TORCH_CHECK(k_in.size(0) == B && k_in.size(1) == H && k_in.size(3) == dqk, "k must be (B, H, M, Dqk) = (", B, ", ",
              H, ", M, ", dqk, "), got ", k_in.sizes());
  TORCH_CHECK(v_in.size(0) == B && v_in.size(1) == H && v_in.size(2) == M, "v must be (B, H, M, Dv) = (", B, ", ", H,
              ", ", M, ", Dv), got ", v_in.sizes());
  TORCH_CHECK(N > 0 && M > 0 && dqk > 0 && dv > 0 && dqk <= 1024 && dv <= 1024,
              "q, k, v must have no empty dimension and head dims of at most 1024");
  at::Tensor mask;
  if (key_mask.has_value()) {
    TORCH_CHECK(key_mask->scalar_type() == at::kBool && key_mask->dim() == 2 && key_mask->size(0) == B &&
                    key_mask->size(1) == M && key_mask->device() == q_in.device(),
                "key_mask must be bool (B, M) = (", B, ", ", M, ") on q's device, got ", key_mask->scalar_type(), " ",
                key_mask->sizes(), " on ", key_mask->device());
    mask = key_mask->contiguous();
  }
  return {unit_last_stride(q_in), unit_last_stride(k_in), unit_last_stride(v_in), mask, B, H, N, M, dqk, dv};
}

cuda::DType kernel_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kBFloat16 ? cuda::DType::bfloat16 : cuda::DType::float16;
}

std::tuple<at::Tensor, at::Tensor> cuda_forward(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                                const std::optional<at::Tensor>& key_mask, bool causal, double scale,
                                                int64_t splits) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Checked c = check_inputs(q_in, k_in, v_in, key_mask);
  const at::Tensor &q = c.q, &k = c.k, &v = c.v, &mask = c.key_mask;
  const int64_t B = c.B, H = c.H, N = c.N, M = c.M, dqk = c.dqk, dv = c.dv;

  using namespace cuda;
  const int64_t key_tiles = (M + kBlockKeys - 1) / kBlockKeys;
  const int64_t blocks = (N + kBlockQueries - 1) / kBlockQueries * ((dv + kDimChunk - 1) / kDimChunk) * B * H;
  TORCH_CHECK(splits >= 0, "splits must be >= 0 (0: chosen for the GPU), got ", splits);
  int split_count = choose_splits(blocks, key_tiles, static_cast<int>(splits), q.get_device());
  const int64_t keys_per_split = (key_tiles + split_count - 1) / split_count * kBlockKeys;
  split_count = static_cast<int>((M + keys_per_split - 1) / keys_per_split);

  auto out = at::empty({B, H, N, dv}, q.options());
  auto lse = at::empty({B, H, N}, q.options().dtype(at::kFloat));
  at::Tensor part_out, part_lse;
  if (split_count > 1) {
    part_out = at::empty({split_count, B, H, N, dv}, q.options().dtype(at::kFloat));
    part_lse = at::empty({split_count, B, H, N}, q.options().dtype(at::kFloat));
  }
  AttentionParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.key_mask = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.part_out = part_out.defined() ? part_out.data_ptr<float>() : nullptr;
  p.part_lse = part_lse.defined() ? part_lse.data_ptr<float>() : nullptr;
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = q.stride(i);
    p.k_stride[i] = k.stride(i);
    p.v_stride[i] = v.stride(i);
  }
  p.batch = static_cast<int>(B);
  p.heads = static_cast<int>(H);
  p.queries = static_cast<int>(N);
  p.keys = static_cast<int>(M);
  p.dim_qk = static_cast<int>(dqk);
  p.dim_v = static_cast<int>(dv);
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.splits = split_count;
  p.keys_per_split = static_cast<int>(keys_per_split);
  const cudaError_t status = attention_forward(p, kernel_dtype(q), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "cuda_attention_forward failed to launch: ", cudaGetErrorString(status));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_backward(const at::Tensor& dout_in, const at::Tensor& q_in,
                                                             const at::Tensor& k_in, const at::Tensor& v_in,
                                                             const at::Tensor& out_in, const at::Tensor& lse_in,
                                                             const std::optional<at::Tensor>& key_mask, bool causal,
                                                             double scale) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Checked c = check_inputs(q_in, k_in, v_in, key_mask);
  check_operand("dout", dout_in, q_in);
  check_operand("out", out_in, q_in);
  TORCH_CHECK(dout_in.sizes() == out_in.sizes() && out_in.sizes() == at::IntArrayRef({c.B, c.H, c.N, c.dv}),
              "dout and out must be (B, H, N, Dv) = (", c.B, ", ", c.H, ", ", c.N, ", ", c.dv, "), got ",
              dout_in.sizes(), " and ", out_in.sizes());
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.sizes() == at::IntArrayRef({c.B, c.H, c.N}) &&
                  lse_in.device() == q_in.device(),
              "lse must be float32 (B, H, N) on q's device, got ", lse_in.scalar_type(), " ", lse_in.sizes(), " on ",
              lse_in.device());
  const at::Tensor dout = unit_last_stride(dout_in), out = out_in.contiguous(), lse = lse_in.contiguous();

  auto delta = at::empty({c.B, c.H, c.N}, lse.options());
  auto dq_accum = at::zeros({c.B, c.H, c.N, c.dqk}, lse.options());
  auto dk = at::empty({c.B, c.H, c.M, c.dqk}, c.q.options());
  auto dv = at::empty({c.B, c.H, c.M, c.dv}, c.q.options());
  cuda::AttentionBackwardParams p{};
  p.q = c.q.data_ptr();
  p.k = c.k.data_ptr();
  p.v = c.v.data_ptr();
  p.out = out.data_ptr();
  p.dout = dout.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.key_mask = c.key_mask.defined() ? c.key_mask.data_ptr<bool>() : nullptr;
  p.delta = delta.data_ptr<float>();
  p.dq_accum = dq_accum.data_ptr<float>();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = c.q.stride(i);
    p.k_stride[i] = c.k.stride(i);
    p.v_stride[i] = c.v.stride(i);
    p.dout_stride[i] = dout.stride(i);
  }
  p.batch = static_cast<int>(c.B);
  p.heads = static_cast<int>(c.H);
  p.queries = static_cast<int>(c.N);
  p.keys = static_cast<int>(c.M);
  p.dim_qk = static_cast<int>(c.dqk);
  p.dim_v = static_cast<int>(c.dv);
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  const cudaError_t status = cuda::attention_backward(p, kernel_dtype(c.q), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "cuda_attention_backward failed to launch: ", cudaGetErrorString(status));
  return {dq_accum.to(c.q.scalar_type()), dk, dv};
}

}  // namespace

void add_cuda_functions(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("cuda_attention_forward", &cuda_forward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("key_mask"),
        py::arg("causal"), py::arg("scale"), py::arg("splits") = 0);
  m.def("cuda_attention_backward", &cuda_backward, py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("key_mask"), py::arg("causal"), py::arg("scale"));
}

}  // namespace perceiver_fast
