// Per-element rules of the monet latent ops, shared by the CPU kernels (latent_ops.cpp) and the CUDA
// kernels (latent_ops_cuda.cu) so that both halves run one definition:
//
//   * is_latent_input / advance_span: the span state machine of a decode slot (the scalar
//     definition is monet.layout.SpanLayout.advance / is_latent_input);
//   * SegmentScan: the left-to-right scan that classifies each token of a training row (kind, step);
//   * mask_allows: the stage-2 attention rule for one (query, key) pair.
//
// Plain C++ with no ATen dependency; under nvcc every function is __host__ __device__.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define MONET_HD __host__ __device__ __forceinline__
#else
#define MONET_HD inline
#endif

namespace monet {

// Per-token kinds written by latent_segments (same values as monet/ops/reference.py KIND_*).
constexpr int8_t kKindText = 0;
constexpr int8_t kKindQuestionImage = 1;
constexpr int8_t kKindHelperImage = 2;
constexpr int8_t kKindLatent = 3;
constexpr int8_t kKindPad = 4;

// Counter value of a slot whose next emitted token is forced to START (monet.layout.FORCE_START):
// the prompt ended with START, which the engine stripped.
constexpr int32_t kForceStart = -1;

// ---------------------------------------------------------------------------------------------
// Span state machine. Per slot one int32 counter `remaining`:
//   -1 (kForceStart)  next emitted token is forced to START; the input is an ordinary embedding
//    0                text mode; sampling START opens a span
//    1 .. K           inside a span and the next input is a latent; emitted token forced to PAD
//                     (remaining > 1) or END (remaining == 1)
//    K + 1            standard layout only: START was just emitted, its position is embedded
// `counter_on_start` is the counter right after START (K in monet-v1, K + 1 in standard).
// ---------------------------------------------------------------------------------------------

// Whether the next input of a slot with this counter is a latent (else: embed the token).
MONET_HD bool is_latent_input(int32_t remaining, int64_t latent_size) {
  return remaining >= 1 && remaining <= latent_size;
}

// One post-sample step: forces *token where the layout dictates and returns the new counter.
// Values below -1 are never produced; they are treated like 1 (emit END, back to text).
MONET_HD int32_t advance_span(int32_t remaining, int64_t* token, int64_t start_id, int64_t pad_id,
                              int64_t end_id, int32_t counter_on_start) {
  if (remaining == kForceStart) {
    *token = start_id;
    return counter_on_start;
  }
  if (remaining == 0) return *token == start_id ? counter_on_start : 0;
  if (remaining > 1) {
    *token = pad_id;
    return remaining - 1;
  }
  *token = end_id;
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Segment scan of one row (latent_segments). Feed the row's tokens in order p = 0 .. L-1.
// Image tokens span <|vision_start|> ... <|vision_end|> inclusive; images at or after the answer
// start are helper images (step = index of the helper image in the answer), the others question
// images. Latent PADs in the answer outside images get the index of their span (counting STARTs in
// the answer). Padding (attention_mask == 0) wins over everything and has step -1.
// ---------------------------------------------------------------------------------------------
struct SegmentIds {
  int64_t vision_start;
  int64_t vision_end;
  int64_t latent_start;
  int64_t latent_pad;
};

struct SegmentScan {
  int64_t depth = 0;    // open vision_start without a matching vision_end
  int64_t helper = -1;  // index of the current helper image in the answer
  int64_t span = -1;    // index of the current latent span in the answer

  MONET_HD void next(int64_t token, bool real, bool answer, const SegmentIds& ids, int8_t* kind,
                     int32_t* step) {
    if (token == ids.vision_start) {
      ++depth;
      if (answer) ++helper;
    }
    if (answer && token == ids.latent_start) ++span;
    int8_t k = kKindText;
    int32_t s = -1;
    if (!real) {
      k = kKindPad;
    } else if (depth > 0) {
      k = answer ? kKindHelperImage : kKindQuestionImage;
      if (answer) s = static_cast<int32_t>(helper);
    } else if (answer && token == ids.latent_pad) {
      k = kKindLatent;
      s = static_cast<int32_t>(span);
    }
    *kind = k;
    *step = s;
    if (token == ids.vision_end) --depth;  // vision_end itself is still inside the image
  }
};

// ---------------------------------------------------------------------------------------------
// Stage-2 attention rule for query i and key j of one row: causal, padding keys hidden; a helper-
// image key of step s is visible only to latent and helper-image queries of step s. A padding query
// sees only itself, so no softmax row is empty.
// ---------------------------------------------------------------------------------------------
MONET_HD bool mask_allows(int64_t i, int64_t j, int8_t kind_i, int32_t step_i, int8_t kind_j,
                          int32_t step_j) {
  if (kind_i == kKindPad) return j == i;
  if (j > i) return false;
  if (kind_j == kKindHelperImage)
    return (kind_i == kKindLatent || kind_i == kKindHelperImage) && step_j == step_i;
  return kind_j != kKindPad;
}

}  // namespace monet
