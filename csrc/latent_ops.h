// Declarations shared by the CPU and CUDA halves of monet._C.
// Semantics are defined by the pure-PyTorch references in monet/ops/reference.py.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

namespace monet {

// Per-token kinds written by latent_segments (keep in sync with monet/ops/reference.py).
constexpr int8_t kKindText = 0;
constexpr int8_t kKindQuestionImage = 1;
constexpr int8_t kKindHelperImage = 2;
constexpr int8_t kKindLatent = 3;
constexpr int8_t kKindPad = 4;

// Argument checks common to both device halves (shapes, dtypes, same device).
void check_embed_args(const at::Tensor& out, const at::Tensor& token_ids, const at::Tensor& slots,
                      const at::Tensor& remaining, const at::Tensor& prev_hidden,
                      const c10::optional<at::Tensor>& embed_weight);
void check_advance_args(const at::Tensor& tokens, const at::Tensor& hidden, const at::Tensor& slots,
                        const at::Tensor& remaining, const at::Tensor& prev_hidden);
void check_scatter_args(const at::Tensor& emb, const at::Tensor& hidden, const at::Tensor& mask,
                        const at::Tensor& out);
void check_segments_args(const at::Tensor& input_ids, const at::Tensor& attention_mask,
                         const at::Tensor& answer_start);
void check_mask_args(const at::Tensor& kind, const at::Tensor& step, const at::Tensor& out);

}  // namespace monet
