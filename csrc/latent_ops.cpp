// Schemas, CPU kernels and Meta (shape-only) kernels of the monet latent ops.
//
// Every op has a pure-PyTorch reference in monet/ops/reference.py that defines its semantics; the
// per-element rules (span state machine, segment scan, attention rule) come from latent_rules.h,
// which the CUDA kernels include too.
// The CPU kernels are row-parallel (at::parallel_for) and copy whole rows with memcpy, so they are
// dtype-agnostic for the row data (fp32/fp16/bf16 all take the same path).
#include "latent_ops.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <limits>

namespace monet {

namespace {

void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* an, const char* bn) {
  TORCH_CHECK(a.device() == b.device(), "monet: ", an, " is on ", a.device(), " but ", bn, " is on ",
              b.device());
}

void check_rows(const at::Tensor& t, const char* name, int64_t d) {
  TORCH_CHECK(t.dim() == 2, "monet: ", name, " must be 2-D [rows, hidden], got shape ", t.sizes());
  TORCH_CHECK(t.size(1) == d, "monet: ", name, " has hidden size ", t.size(1), ", expected ", d);
  TORCH_CHECK(t.stride(1) == 1, "monet: ", name, " rows must be contiguous");
}

void check_index(const at::Tensor& t, const char* name, int64_t n, at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "monet: ", name, " must be 1-D of length ", n,
              ", got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "monet: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "monet: ", name, " must be contiguous");
}

}  // namespace

void check_embed_args(const at::Tensor& out, const at::Tensor& token_ids, const at::Tensor& slots,
                      const at::Tensor& remaining, const at::Tensor& prev_hidden,
                      const c10::optional<at::Tensor>& embed_weight) {
  const int64_t d = out.dim() == 2 ? out.size(1) : -1;
  check_rows(out, "out", d);
  check_rows(prev_hidden, "prev_hidden", d);
  check_index(token_ids, "token_ids", out.size(0), at::kLong);
  check_index(slots, "slots", out.size(0), at::kLong);
  check_index(remaining, "remaining", prev_hidden.size(0), at::kInt);
  TORCH_CHECK(prev_hidden.scalar_type() == out.scalar_type(), "monet: prev_hidden dtype ",
              prev_hidden.scalar_type(), " differs from out dtype ", out.scalar_type());
  for (const auto* t : {&token_ids, &slots, &remaining, &prev_hidden})
    check_same_device(*t, out, "an input", "out");
  if (embed_weight.has_value()) {
    check_rows(*embed_weight, "embed_weight", d);
    TORCH_CHECK(embed_weight->scalar_type() == out.scalar_type(), "monet: embed_weight dtype ",
                embed_weight->scalar_type(), " differs from out dtype ", out.scalar_type());
    check_same_device(*embed_weight, out, "embed_weight", "out");
  }
}

void check_advance_args(const at::Tensor& tokens, const at::Tensor& hidden, const at::Tensor& slots,
                        const at::Tensor& remaining, const at::Tensor& prev_hidden) {
  const int64_t d = prev_hidden.dim() == 2 ? prev_hidden.size(1) : -1;
  check_rows(prev_hidden, "prev_hidden", d);
  TORCH_CHECK(prev_hidden.is_contiguous(), "monet: prev_hidden must be contiguous");
  check_index(tokens, "tokens", tokens.dim() == 1 ? tokens.size(0) : -1, at::kLong);
  check_rows(hidden, "hidden", d);
  TORCH_CHECK(hidden.size(0) == tokens.size(0), "monet: hidden has ", hidden.size(0),
              " rows but tokens has ", tokens.size(0));
  TORCH_CHECK(hidden.scalar_type() == prev_hidden.scalar_type(), "monet: hidden dtype ",
              hidden.scalar_type(), " differs from prev_hidden dtype ", prev_hidden.scalar_type());
  check_index(slots, "slots", tokens.size(0), at::kLong);
  check_index(remaining, "remaining", prev_hidden.size(0), at::kInt);
  for (const auto* t : {&hidden, &slots, &remaining, &prev_hidden})
    check_same_device(*t, tokens, "an input", "tokens");
}

void check_span_layout(int64_t latent_size, int64_t counter_on_start) {
  TORCH_CHECK(latent_size >= 1, "monet: latent_size must be >= 1, got ", latent_size);
  TORCH_CHECK(counter_on_start == latent_size || counter_on_start == latent_size + 1,
              "monet: counter_on_start must be latent_size (monet-v1) or latent_size + 1 (standard), "
              "got ", counter_on_start, " with latent_size ", latent_size);
}

void check_scatter_args(const at::Tensor& emb, const at::Tensor& hidden, const at::Tensor& mask,
                        const at::Tensor& out) {
  TORCH_CHECK(emb.dim() == 3, "monet: emb must be [B, L, D], got ", emb.sizes());
  TORCH_CHECK(hidden.sizes() == emb.sizes(), "monet: hidden shape ", hidden.sizes(),
              " differs from emb shape ", emb.sizes());
  TORCH_CHECK(out.sizes() == emb.sizes(), "monet: out shape ", out.sizes(), " differs from ",
              emb.sizes());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == emb.size(0) && mask.size(1) == emb.size(1),
              "monet: mask must be [B, L] = ", emb.sizes().slice(0, 2), ", got ", mask.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kBool, "monet: mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK(hidden.scalar_type() == emb.scalar_type() && out.scalar_type() == emb.scalar_type(),
              "monet: emb, hidden and out must share a dtype");
  for (const auto* t : {&emb, &hidden, &mask, &out})
    TORCH_CHECK(t->is_contiguous(), "monet: latent_scatter needs contiguous tensors");
  check_same_device(hidden, emb, "hidden", "emb");
  check_same_device(mask, emb, "mask", "emb");
  check_same_device(out, emb, "out", "emb");
}

void check_segments_args(const at::Tensor& input_ids, const at::Tensor& attention_mask,
                         const at::Tensor& answer_start) {
  TORCH_CHECK(input_ids.dim() == 2 && input_ids.scalar_type() == at::kLong,
              "monet: input_ids must be int64 [B, L], got ", input_ids.scalar_type(), " ",
              input_ids.sizes());
  TORCH_CHECK(attention_mask.sizes() == input_ids.sizes(), "monet: attention_mask shape ",
              attention_mask.sizes(), " differs from input_ids shape ", input_ids.sizes());
  TORCH_CHECK(attention_mask.scalar_type() == at::kLong, "monet: attention_mask must be int64");
  check_index(answer_start, "answer_start", input_ids.size(0), at::kLong);
  TORCH_CHECK(input_ids.is_contiguous() && attention_mask.is_contiguous(),
              "monet: input_ids and attention_mask must be contiguous");
  check_same_device(attention_mask, input_ids, "attention_mask", "input_ids");
  check_same_device(answer_start, input_ids, "answer_start", "input_ids");
}

void check_mask_args(const at::Tensor& kind, const at::Tensor& step, const at::Tensor& out) {
  TORCH_CHECK(kind.dim() == 2 && kind.scalar_type() == at::kChar, "monet: kind must be int8 [B, L]");
  TORCH_CHECK(step.sizes() == kind.sizes() && step.scalar_type() == at::kInt,
              "monet: step must be int32 with kind's shape");
  const int64_t B = kind.size(0), L = kind.size(1);
  TORCH_CHECK(out.dim() == 4 && out.size(0) == B && out.size(1) == 1 && out.size(2) == L &&
                  out.size(3) == L,
              "monet: mask out must be [B, 1, L, L] = [", B, ", 1, ", L, ", ", L, "], got ",
              out.sizes());
  TORCH_CHECK(out.is_contiguous() && kind.is_contiguous() && step.is_contiguous(),
              "monet: latent_attention_mask needs contiguous tensors");
  check_same_device(step, kind, "step", "kind");
  check_same_device(out, kind, "out", "kind");
}

namespace {

// ---------------------------------------------------------------------------------------------
// CPU kernels
// ---------------------------------------------------------------------------------------------

void latent_embed_cpu(at::Tensor& out, const at::Tensor& token_ids, const at::Tensor& slots,
                      const at::Tensor& remaining, const at::Tensor& prev_hidden,
                      const c10::optional<at::Tensor>& embed_weight, int64_t latent_size) {
  check_embed_args(out, token_ids, slots, remaining, prev_hidden, embed_weight);
  TORCH_CHECK(latent_size >= 1, "monet: latent_size must be >= 1, got ", latent_size);
  const int64_t n = out.size(0), esize = out.element_size(), row_bytes = out.size(1) * esize;
  const int64_t num_slots = prev_hidden.size(0);
  const int64_t* tok = token_ids.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int32_t* rem = remaining.data_ptr<int32_t>();
  char* dst = static_cast<char*>(out.data_ptr());
  const char* hid = static_cast<const char*>(prev_hidden.data_ptr());
  const int64_t out_stride = out.stride(0) * esize, hid_stride = prev_hidden.stride(0) * esize;
  const char* emb = embed_weight ? static_cast<const char*>(embed_weight->data_ptr()) : nullptr;
  const int64_t emb_stride = embed_weight ? embed_weight->stride(0) * esize : 0;
  const int64_t vocab = embed_weight ? embed_weight->size(0) : 0;
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t s = slot[i];
      TORCH_CHECK(s < num_slots, "monet: slots[", i, "] = ", s, " out of range [-1, ", num_slots, ")");
      const int32_t r = s >= 0 ? rem[s] : 0;
      if (is_latent_input(r, latent_size)) {
        std::memcpy(dst + i * out_stride, hid + s * hid_stride, row_bytes);
      } else if (emb != nullptr) {
        TORCH_CHECK(tok[i] >= 0 && tok[i] < vocab, "monet: token_ids[", i, "] = ", tok[i],
                    " out of range [0, ", vocab, ")");
        std::memcpy(dst + i * out_stride, emb + tok[i] * emb_stride, row_bytes);
      }
    }
  });
}

void latent_advance_cpu(at::Tensor& tokens, const at::Tensor& hidden, const at::Tensor& slots,
                        at::Tensor& remaining, at::Tensor& prev_hidden, int64_t start_id,
                        int64_t pad_id, int64_t end_id, int64_t latent_size,
                        int64_t counter_on_start) {
  check_advance_args(tokens, hidden, slots, remaining, prev_hidden);
  check_span_layout(latent_size, counter_on_start);
  const int64_t n = tokens.size(0), num_slots = prev_hidden.size(0);
  const int64_t esize = hidden.element_size(), row_bytes = hidden.size(1) * esize;
  const int64_t hid_stride = hidden.stride(0) * esize, prev_stride = prev_hidden.stride(0) * esize;
  const int32_t on_start = static_cast<int32_t>(counter_on_start);
  int64_t* tok = tokens.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  int32_t* rem = remaining.data_ptr<int32_t>();
  const char* hid = static_cast<const char*>(hidden.data_ptr());
  char* prev = static_cast<char*>(prev_hidden.data_ptr());
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t s = slot[i];
      if (s < 0) continue;
      TORCH_CHECK(s < num_slots, "monet: slots[", i, "] = ", s, " out of range [-1, ", num_slots, ")");
      const int32_t r = advance_span(rem[s], &tok[i], start_id, pad_id, end_id, on_start);
      rem[s] = r;
      if (is_latent_input(r, latent_size))
        std::memcpy(prev + s * prev_stride, hid + i * hid_stride, row_bytes);
    }
  });
}

void latent_scatter_out_cpu(const at::Tensor& emb, const at::Tensor& hidden, const at::Tensor& mask,
                            at::Tensor& out) {
  check_scatter_args(emb, hidden, mask, out);
  const int64_t B = emb.size(0), L = emb.size(1);
  const int64_t row_bytes = emb.size(2) * emb.element_size();
  const char* e = static_cast<const char*>(emb.data_ptr());
  const char* h = static_cast<const char*>(hidden.data_ptr());
  const bool* m = mask.data_ptr<bool>();
  char* o = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, B * L, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (m[i]) {
        TORCH_CHECK(i % L != 0, "monet: latent_scatter mask is set at position 0 of batch row ",
                    i / L, ": a latent needs a previous position");
        std::memcpy(o + i * row_bytes, h + (i - 1) * row_bytes, row_bytes);
      } else {
        std::memcpy(o + i * row_bytes, e + i * row_bytes, row_bytes);
      }
    }
  });
}

at::Tensor latent_scatter_cpu(const at::Tensor& emb, const at::Tensor& hidden, const at::Tensor& mask) {
  at::Tensor out = at::empty_like(emb, at::MemoryFormat::Contiguous);
  latent_scatter_out_cpu(emb, hidden, mask, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> latent_scatter_backward_cpu(const at::Tensor& grad,
                                                               const at::Tensor& mask) {
  at::Tensor g = grad.contiguous();
  TORCH_CHECK(g.dim() == 3 && mask.dim() == 2 && mask.size(0) == g.size(0) &&
                  mask.size(1) == g.size(1) && mask.scalar_type() == at::kBool,
              "monet: latent_scatter_backward needs grad [B, L, D] and bool mask [B, L]");
  at::Tensor grad_emb = at::empty_like(g), grad_hidden = at::empty_like(g);
  const int64_t L = g.size(1), rows = g.size(0) * L;
  const int64_t row_bytes = g.size(2) * g.element_size();
  const char* gp = static_cast<const char*>(g.data_ptr());
  const bool* m = mask.contiguous().data_ptr<bool>();
  char* ge = static_cast<char*>(grad_emb.data_ptr());
  char* gh = static_cast<char*>(grad_hidden.data_ptr());
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (m[i]) std::memset(ge + i * row_bytes, 0, row_bytes);
      else std::memcpy(ge + i * row_bytes, gp + i * row_bytes, row_bytes);
      // hidden[b, p] feeds out[b, p + 1] when that position is a latent.
      const bool feeds = (i % L) + 1 < L && m[i + 1];
      if (feeds) std::memcpy(gh + i * row_bytes, gp + (i + 1) * row_bytes, row_bytes);
      else std::memset(gh + i * row_bytes, 0, row_bytes);
    }
  });
  return {grad_emb, grad_hidden};
}

std::tuple<at::Tensor, at::Tensor> latent_segments_cpu(const at::Tensor& input_ids,
                                                       const at::Tensor& attention_mask,
                                                       const at::Tensor& answer_start,
                                                       int64_t vision_start_id, int64_t vision_end_id,
                                                       int64_t latent_start_id, int64_t latent_pad_id) {
  check_segments_args(input_ids, attention_mask, answer_start);
  const int64_t B = input_ids.size(0), L = input_ids.size(1);
  at::Tensor kind = at::empty({B, L}, input_ids.options().dtype(at::kChar));
  at::Tensor step = at::empty({B, L}, input_ids.options().dtype(at::kInt));
  const int64_t* ids = input_ids.data_ptr<int64_t>();
  const int64_t* am = attention_mask.data_ptr<int64_t>();
  const int64_t* ans = answer_start.data_ptr<int64_t>();
  int8_t* k = kind.data_ptr<int8_t>();
  int32_t* st = step.data_ptr<int32_t>();
  const SegmentIds seg{vision_start_id, vision_end_id, latent_start_id, latent_pad_id};
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      SegmentScan scan;
      for (int64_t p = 0; p < L; ++p) {
        const int64_t i = b * L + p;
        scan.next(ids[i], am[i] != 0, p >= ans[b], seg, &k[i], &st[i]);
      }
    }
  });
  return {kind, step};
}

template <typename T>
void fill_mask_rows(const int8_t* kind, const int32_t* step, T* out, int64_t B, int64_t L, T yes, T no) {
  at::parallel_for(0, B * L, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / L, i = row % L;
      const int8_t* kb = kind + b * L;
      const int32_t* sb = step + b * L;
      T* o = out + row * L;
      const int8_t ki = kb[i];
      const int32_t si = sb[i];
      for (int64_t j = 0; j < L; ++j) o[j] = mask_allows(i, j, ki, si, kb[j], sb[j]) ? yes : no;
    }
  });
}

void latent_attention_mask_out_cpu(const at::Tensor& kind, const at::Tensor& step, at::Tensor& out) {
  check_mask_args(kind, step, out);
  const int64_t B = kind.size(0), L = kind.size(1);
  const int8_t* k = kind.data_ptr<int8_t>();
  const int32_t* s = step.data_ptr<int32_t>();
  if (out.scalar_type() == at::kBool) {
    fill_mask_rows<bool>(k, s, out.data_ptr<bool>(), B, L, true, false);
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "latent_mask", [&] {
      fill_mask_rows<scalar_t>(k, s, out.data_ptr<scalar_t>(), B, L, scalar_t(0),
                               std::numeric_limits<scalar_t>::lowest());
    });
  }
}

at::Tensor new_mask(const at::Tensor& kind, c10::optional<at::ScalarType> dtype) {
  const int64_t B = kind.size(0), L = kind.dim() == 2 ? kind.size(1) : 0;
  return at::empty({B, 1, L, L}, kind.options().dtype(dtype.value_or(at::kBool)));
}

at::Tensor latent_attention_mask_cpu(const at::Tensor& kind, const at::Tensor& step,
                                     c10::optional<at::ScalarType> dtype) {
  at::Tensor out = new_mask(kind, dtype);
  latent_attention_mask_out_cpu(kind, step, out);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Meta kernels: shapes only, so the ops trace under torch.compile / FakeTensor.
// ---------------------------------------------------------------------------------------------

void latent_embed_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const at::Tensor&, const c10::optional<at::Tensor>&, int64_t) {}

void latent_advance_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&,
                         int64_t, int64_t, int64_t, int64_t, int64_t) {}

at::Tensor latent_scatter_meta(const at::Tensor& emb, const at::Tensor&, const at::Tensor&) {
  return at::empty_like(emb, at::MemoryFormat::Contiguous);
}

void latent_scatter_out_meta(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&) {}

std::tuple<at::Tensor, at::Tensor> latent_scatter_backward_meta(const at::Tensor& grad,
                                                                const at::Tensor&) {
  return {at::empty_like(grad, at::MemoryFormat::Contiguous),
          at::empty_like(grad, at::MemoryFormat::Contiguous)};
}

std::tuple<at::Tensor, at::Tensor> latent_segments_meta(const at::Tensor& input_ids, const at::Tensor&,
                                                        const at::Tensor&, int64_t, int64_t, int64_t,
                                                        int64_t) {
  return {at::empty(input_ids.sizes(), input_ids.options().dtype(at::kChar)),
          at::empty(input_ids.sizes(), input_ids.options().dtype(at::kInt))};
}

at::Tensor latent_attention_mask_meta(const at::Tensor& kind, const at::Tensor&,
                                      c10::optional<at::ScalarType> dtype) {
  return new_mask(kind, dtype);
}

void latent_attention_mask_out_meta(const at::Tensor&, const at::Tensor&, at::Tensor&) {}

}  // namespace

// The .out overloads return nothing (instead of the conventional Tensor(a!) alias of `out`): custom
// ops whose outputs alias inputs cannot be functionalized, so only this form traces under
// torch.compile / AOT autograd.
TORCH_LIBRARY(monet, m) {
  m.def(
      "latent_embed_(Tensor(a!) out, Tensor token_ids, Tensor slots, Tensor remaining, "
      "Tensor prev_hidden, Tensor? embed_weight, int latent_size) -> ()");
  // The span layout reaches the decode ops as integers: latent_size (K) and, for latent_advance_,
  // counter_on_start (monet.layout.SpanLayout.counter_on_start: K in monet-v1, K + 1 in standard).
  m.def(
      "latent_advance_(Tensor(a!) tokens, Tensor hidden, Tensor slots, Tensor(b!) remaining, "
      "Tensor(c!) prev_hidden, int start_id, int pad_id, int end_id, int latent_size, "
      "int counter_on_start) -> ()");
  m.def("latent_scatter(Tensor emb, Tensor hidden, Tensor mask) -> Tensor");
  m.def("latent_scatter.out(Tensor emb, Tensor hidden, Tensor mask, *, Tensor(a!) out) -> ()");
  m.def("latent_scatter_backward(Tensor grad, Tensor mask) -> (Tensor, Tensor)");
  m.def(
      "latent_segments(Tensor input_ids, Tensor attention_mask, Tensor answer_start, "
      "int vision_start_id, int vision_end_id, int latent_start_id, "
      "int latent_pad_id) -> (Tensor, Tensor)");
  m.def("latent_attention_mask(Tensor kind, Tensor step, ScalarType? dtype=None) -> Tensor");
  m.def("latent_attention_mask.out(Tensor kind, Tensor step, *, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(monet, CPU, m) {
  m.impl("latent_embed_", &latent_embed_cpu);
  m.impl("latent_advance_", &latent_advance_cpu);
  m.impl("latent_scatter", &latent_scatter_cpu);
  m.impl("latent_scatter.out", &latent_scatter_out_cpu);
  m.impl("latent_scatter_backward", &latent_scatter_backward_cpu);
  m.impl("latent_segments", &latent_segments_cpu);
  m.impl("latent_attention_mask", &latent_attention_mask_cpu);
  m.impl("latent_attention_mask.out", &latent_attention_mask_out_cpu);
}

TORCH_LIBRARY_IMPL(monet, Meta, m) {
  m.impl("latent_embed_", &latent_embed_meta);
  m.impl("latent_advance_", &latent_advance_meta);
  m.impl("latent_scatter", &latent_scatter_meta);
  m.impl("latent_scatter.out", &latent_scatter_out_meta);
  m.impl("latent_scatter_backward", &latent_scatter_backward_meta);
  m.impl("latent_segments", &latent_segments_meta);
  m.impl("latent_attention_mask", &latent_attention_mask_meta);
  m.impl("latent_attention_mask.out", &latent_attention_mask_out_meta);
}

}  // namespace monet
