// Declarations shared by the CPU and CUDA halves of monet._C.
// Semantics are defined by the pure-PyTorch references in monet/ops/reference.py; the per-element
// rules both halves run are in latent_rules.h.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include "latent_rules.h"

namespace monet {

// Argument checks common to both device halves (shapes, dtypes, same device).
void check_embed_args(const at::Tensor& out, const at::Tensor& token_ids, const at::Tensor& slots,
                      const at::Tensor& remaining, const at::Tensor& prev_hidden,
                      const c10::optional<at::Tensor>& embed_weight);
void check_advance_args(const at::Tensor& tokens, const at::Tensor& hidden, const at::Tensor& slots,
                        const at::Tensor& remaining, const at::Tensor& prev_hidden);
// latent_size >= 1 and counter_on_start in {latent_size (monet-v1), latent_size + 1 (standard)}.
void check_span_layout(int64_t latent_size, int64_t counter_on_start);
void check_scatter_args(const at::Tensor& emb, const at::Tensor& hidden, const at::Tensor& mask,
                        const at::Tensor& out);
void check_segments_args(const at::Tensor& input_ids, const at::Tensor& attention_mask,
                         const at::Tensor& answer_start);
void check_mask_args(const at::Tensor& kind, const at::Tensor& step, const at::Tensor& out);

}  // namespace monet
