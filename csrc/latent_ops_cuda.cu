// CUDA kernels of the monet latent ops. Same semantics as the CPU kernels (latent_ops.cpp) and the
// references (monet/ops/reference.py); the per-element rules (span state machine, segment scan,
// attention rule) are the __host__ __device__ functions of latent_rules.h that the CPU kernels run
// too. All launches go to the current stream, read no data back to
// the host and allocate nothing inside the decode ops, so they can be captured in CUDA graphs.
//
// Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE
// headers that a bare toolkit may lack).
#include "latent_ops.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <limits>

namespace monet {
namespace {

constexpr int kThreads = 256;

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline void check_launch() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }

// Copy `bytes` from src to dst with the block's threads, 16 bytes at a time when aligned.
__device__ __forceinline__ void block_copy(char* __restrict__ dst, const char* __restrict__ src,
                                           int64_t bytes) {
  const bool vec = ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) | bytes) & 15) == 0;
  if (vec) {
    const int64_t n = bytes / 16;
    for (int64_t k = threadIdx.x; k < n; k += blockDim.x)
      reinterpret_cast<int4*>(dst)[k] = reinterpret_cast<const int4*>(src)[k];
  } else {
    for (int64_t k = threadIdx.x; k < bytes; k += blockDim.x) dst[k] = src[k];
  }
}

__device__ __forceinline__ void block_zero(char* __restrict__ dst, int64_t bytes) {
  const bool vec = ((reinterpret_cast<uintptr_t>(dst) | bytes) & 15) == 0;
  if (vec) {
    const int64_t n = bytes / 16;
    for (int64_t k = threadIdx.x; k < n; k += blockDim.x) reinterpret_cast<int4*>(dst)[k] = make_int4(0, 0, 0, 0);
  } else {
    for (int64_t k = threadIdx.x; k < bytes; k += blockDim.x) dst[k] = 0;
  }
}

// ---------------------------------------------------------------------------------------------
// latent_embed_: one block per row.
// ---------------------------------------------------------------------------------------------
__global__ void latent_embed_kernel(char* __restrict__ out, int64_t out_stride,
                                    const int64_t* __restrict__ tok, const int64_t* __restrict__ slot,
                                    const int32_t* __restrict__ rem, const char* __restrict__ prev,
                                    int64_t prev_stride, const char* __restrict__ emb,
                                    int64_t emb_stride, int64_t row_bytes, int64_t latent_size) {
  const int64_t i = blockIdx.x;
  const int64_t s = slot[i];
  const int32_t r = s >= 0 ? rem[s] : 0;
  if (is_latent_input(r, latent_size)) {
    block_copy(out + i * out_stride, prev + s * prev_stride, row_bytes);
  } else if (emb != nullptr) {
    block_copy(out + i * out_stride, emb + tok[i] * emb_stride, row_bytes);
  }
}

void latent_embed_cuda(at::Tensor& out, const at::Tensor& token_ids, const at::Tensor& slots,
                       const at::Tensor& remaining, const at::Tensor& prev_hidden,
                       const c10::optional<at::Tensor>& embed_weight, int64_t latent_size) {
  check_embed_args(out, token_ids, slots, remaining, prev_hidden, embed_weight);
  TORCH_CHECK(latent_size >= 1, "monet: latent_size must be >= 1, got ", latent_size);
  const int64_t n = out.size(0);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t es = out.element_size();
  latent_embed_kernel<<<n, kThreads, 0, stream()>>>(
      static_cast<char*>(out.data_ptr()), out.stride(0) * es, token_ids.data_ptr<int64_t>(),
      slots.data_ptr<int64_t>(), remaining.data_ptr<int32_t>(),
      static_cast<const char*>(prev_hidden.data_ptr()), prev_hidden.stride(0) * es,
      embed_weight ? static_cast<const char*>(embed_weight->data_ptr()) : nullptr,
      embed_weight ? embed_weight->stride(0) * es : 0, out.size(1) * es, latent_size);
  check_launch();
}

// ---------------------------------------------------------------------------------------------
// latent_advance_: one block per row; thread 0 runs the state machine, the block copies the row.
// Rows must name distinct slots (one row per request), so blocks never race.
// ---------------------------------------------------------------------------------------------
__global__ void latent_advance_kernel(int64_t* __restrict__ tok, const char* __restrict__ hidden,
                                      int64_t hid_stride, const int64_t* __restrict__ slot,
                                      int32_t* __restrict__ rem, char* __restrict__ prev,
                                      int64_t prev_stride, int64_t row_bytes, int64_t start_id,
                                      int64_t pad_id, int64_t end_id, int64_t latent_size,
                                      int32_t on_start) {
  const int64_t i = blockIdx.x;
  const int64_t s = slot[i];
  if (s < 0) return;
  __shared__ int32_t r_shared;
  if (threadIdx.x == 0) {
    const int32_t r = advance_span(rem[s], &tok[i], start_id, pad_id, end_id, on_start);
    rem[s] = r;
    r_shared = r;
  }
  __syncthreads();
  if (is_latent_input(r_shared, latent_size)) block_copy(prev + s * prev_stride, hidden + i * hid_stride, row_bytes);
}

void latent_advance_cuda(at::Tensor& tokens, const at::Tensor& hidden, const at::Tensor& slots,
                         at::Tensor& remaining, at::Tensor& prev_hidden, int64_t start_id,
                         int64_t pad_id, int64_t end_id, int64_t latent_size,
                         int64_t counter_on_start) {
  check_advance_args(tokens, hidden, slots, remaining, prev_hidden);
  check_span_layout(latent_size, counter_on_start);
  const int64_t n = tokens.size(0);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(tokens.device());
  const int64_t es = hidden.element_size();
  latent_advance_kernel<<<n, kThreads, 0, stream()>>>(
      tokens.data_ptr<int64_t>(), static_cast<const char*>(hidden.data_ptr()), hidden.stride(0) * es,
      slots.data_ptr<int64_t>(), remaining.data_ptr<int32_t>(),
      static_cast<char*>(prev_hidden.data_ptr()), prev_hidden.stride(0) * es, hidden.size(1) * es,
      start_id, pad_id, end_id, latent_size, static_cast<int32_t>(counter_on_start));
  check_launch();
}

// ---------------------------------------------------------------------------------------------
// latent_scatter (+ backward): one block per (b, p) row.
// ---------------------------------------------------------------------------------------------
__global__ void latent_scatter_kernel(const char* __restrict__ emb, const char* __restrict__ hidden,
                                      const bool* __restrict__ mask, char* __restrict__ out,
                                      int64_t L, int64_t row_bytes) {
  const int64_t i = blockIdx.x;
  // Position 0 never has a predecessor: the Python wrapper rejects such masks before launch, and
  // here a set bit at p = 0 falls back to emb instead of reading the previous batch row.
  if (mask[i] && i % L != 0) block_copy(out + i * row_bytes, hidden + (i - 1) * row_bytes, row_bytes);
  else block_copy(out + i * row_bytes, emb + i * row_bytes, row_bytes);
}

void latent_scatter_out_cuda(const at::Tensor& emb, const at::Tensor& hidden, const at::Tensor& mask,
                             at::Tensor& out) {
  check_scatter_args(emb, hidden, mask, out);
  const int64_t rows = emb.size(0) * emb.size(1);
  if (rows == 0 || emb.size(2) == 0) return;
  const c10::cuda::CUDAGuard guard(emb.device());
  latent_scatter_kernel<<<rows, kThreads, 0, stream()>>>(
      static_cast<const char*>(emb.data_ptr()), static_cast<const char*>(hidden.data_ptr()),
      mask.data_ptr<bool>(), static_cast<char*>(out.data_ptr()), emb.size(1),
      emb.size(2) * emb.element_size());
  check_launch();
}

at::Tensor latent_scatter_cuda(const at::Tensor& emb, const at::Tensor& hidden, const at::Tensor& mask) {
  at::Tensor out = at::empty_like(emb, at::MemoryFormat::Contiguous);
  latent_scatter_out_cuda(emb, hidden, mask, out);
  return out;
}

__global__ void latent_scatter_backward_kernel(const char* __restrict__ grad, const bool* __restrict__ mask,
                                               char* __restrict__ grad_emb, char* __restrict__ grad_hidden,
                                               int64_t L, int64_t row_bytes) {
  const int64_t i = blockIdx.x;
  if (mask[i]) block_zero(grad_emb + i * row_bytes, row_bytes);
  else block_copy(grad_emb + i * row_bytes, grad + i * row_bytes, row_bytes);
  const bool feeds = (i % L) + 1 < L && mask[i + 1];
  if (feeds) block_copy(grad_hidden + i * row_bytes, grad + (i + 1) * row_bytes, row_bytes);
  else block_zero(grad_hidden + i * row_bytes, row_bytes);
}

std::tuple<at::Tensor, at::Tensor> latent_scatter_backward_cuda(const at::Tensor& grad_in,
                                                                const at::Tensor& mask_in) {
  at::Tensor grad = grad_in.contiguous();
  at::Tensor mask = mask_in.contiguous();
  TORCH_CHECK(grad.dim() == 3 && mask.dim() == 2 && mask.size(0) == grad.size(0) &&
                  mask.size(1) == grad.size(1) && mask.scalar_type() == at::kBool,
              "monet: latent_scatter_backward needs grad [B, L, D] and bool mask [B, L]");
  at::Tensor grad_emb = at::empty_like(grad), grad_hidden = at::empty_like(grad);
  const int64_t rows = grad.size(0) * grad.size(1);
  if (rows == 0 || grad.size(2) == 0) return {grad_emb, grad_hidden};
  const c10::cuda::CUDAGuard guard(grad.device());
  latent_scatter_backward_kernel<<<rows, kThreads, 0, stream()>>>(
      static_cast<const char*>(grad.data_ptr()), mask.data_ptr<bool>(),
      static_cast<char*>(grad_emb.data_ptr()), static_cast<char*>(grad_hidden.data_ptr()),
      grad.size(1), grad.size(2) * grad.element_size());
  check_launch();
  return {grad_emb, grad_hidden};
}

// ---------------------------------------------------------------------------------------------
// latent_segments: one thread per batch row scanning L (B is small; the scan is memory-bound).
// ---------------------------------------------------------------------------------------------
__global__ void latent_segments_kernel(const int64_t* __restrict__ ids, const int64_t* __restrict__ am,
                                       const int64_t* __restrict__ ans, int8_t* __restrict__ kind,
                                       int32_t* __restrict__ step, int64_t B, int64_t L,
                                       SegmentIds seg) {
  const int64_t b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= B) return;
  SegmentScan scan;
  for (int64_t p = 0; p < L; ++p) {
    const int64_t i = b * L + p;
    scan.next(ids[i], am[i] != 0, p >= ans[b], seg, &kind[i], &step[i]);
  }
}

std::tuple<at::Tensor, at::Tensor> latent_segments_cuda(const at::Tensor& input_ids,
                                                        const at::Tensor& attention_mask,
                                                        const at::Tensor& answer_start,
                                                        int64_t vision_start_id, int64_t vision_end_id,
                                                        int64_t latent_start_id, int64_t latent_pad_id) {
  check_segments_args(input_ids, attention_mask, answer_start);
  const int64_t B = input_ids.size(0), L = input_ids.size(1);
  at::Tensor kind = at::empty({B, L}, input_ids.options().dtype(at::kChar));
  at::Tensor step = at::empty({B, L}, input_ids.options().dtype(at::kInt));
  if (B == 0 || L == 0) return {kind, step};
  const c10::cuda::CUDAGuard guard(input_ids.device());
  const int threads = 64;
  latent_segments_kernel<<<(B + threads - 1) / threads, threads, 0, stream()>>>(
      input_ids.data_ptr<int64_t>(), attention_mask.data_ptr<int64_t>(),
      answer_start.data_ptr<int64_t>(), kind.data_ptr<int8_t>(), step.data_ptr<int32_t>(), B, L,
      SegmentIds{vision_start_id, vision_end_id, latent_start_id, latent_pad_id});
  check_launch();
  return {kind, step};
}

// ---------------------------------------------------------------------------------------------
// latent_attention_mask: one block per query row (b, i); the block's threads stride over the L
// keys j of that row, one output element each.
// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void latent_mask_kernel(const int8_t* __restrict__ kind, const int32_t* __restrict__ step,
                                   T* __restrict__ out, int64_t L, T yes, T no) {
  const int64_t row = blockIdx.x;  // row = b * L + i
  const int64_t b = row / L, i = row % L;
  const int8_t* kb = kind + b * L;
  const int32_t* sb = step + b * L;
  const int8_t ki = kb[i];
  const int32_t si = sb[i];
  T* o = out + row * L;
  for (int64_t j = threadIdx.x; j < L; j += blockDim.x)
    o[j] = mask_allows(i, j, ki, si, kb[j], sb[j]) ? yes : no;
}

template <typename T>
void launch_mask(const at::Tensor& kind, const at::Tensor& step, at::Tensor& out, T yes, T no) {
  const int64_t rows = kind.size(0) * kind.size(1);
  latent_mask_kernel<T><<<rows, kThreads, 0, stream()>>>(kind.data_ptr<int8_t>(), step.data_ptr<int32_t>(),
                                                         out.data_ptr<T>(), kind.size(1), yes, no);
  check_launch();
}

void latent_attention_mask_out_cuda(const at::Tensor& kind, const at::Tensor& step, at::Tensor& out) {
  check_mask_args(kind, step, out);
  if (kind.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(kind.device());
  if (out.scalar_type() == at::kBool) {
    launch_mask<bool>(kind, step, out, true, false);
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "latent_mask_cuda", [&] {
      launch_mask<scalar_t>(kind, step, out, scalar_t(0), std::numeric_limits<scalar_t>::lowest());
    });
  }
}

at::Tensor latent_attention_mask_cuda(const at::Tensor& kind, const at::Tensor& step,
                                      c10::optional<at::ScalarType> dtype) {
  const int64_t B = kind.size(0), L = kind.dim() == 2 ? kind.size(1) : 0;
  at::Tensor out = at::empty({B, 1, L, L}, kind.options().dtype(dtype.value_or(at::kBool)));
  latent_attention_mask_out_cuda(kind, step, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(monet, CUDA, m) {
  m.impl("latent_embed_", &latent_embed_cuda);
  m.impl("latent_advance_", &latent_advance_cuda);
  m.impl("latent_scatter", &latent_scatter_cuda);
  m.impl("latent_scatter.out", &latent_scatter_out_cuda);
  m.impl("latent_scatter_backward", &latent_scatter_backward_cuda);
  m.impl("latent_segments", &latent_segments_cuda);
  m.impl("latent_attention_mask", &latent_attention_mask_cuda);
  m.impl("latent_attention_mask.out", &latent_attention_mask_out_cuda);
}

}  // namespace monet
