"""Device-resident per-request latent state for the vLLM runner (no vLLM imports here).

Every live request (from its first schedule to ``finished_req_ids``; preempted and unscheduled
requests keep theirs) owns a *slot*: a row in preallocated device tensors

* ``remaining`` [S] int32 — the span counter of :mod:`monet.layout`,
* ``prev_hidden`` [S, D] — the final-norm hidden row that is the next latent input,
* ``k_of_slot`` [S] int32 / ``v1_of_slot`` [S] bool — the request's span layout as integers (to mask
  a batch to one layout when several are present),
* ``store`` [S, H, D] + ``n_latents`` [S] — every latent the request was fed, in order (returned to
  the caller on request and re-fed when a preempted request is recomputed).

The persistent batch (rows ``0..num_reqs-1`` of vLLM's InputBatch) maps to slots through
``slot_of_index``; it is rebuilt on the host only in steps where the batch's request order changed
(add/remove/condense/reorder), and copied to the device then. Per step the device work is one
``latent_embed_`` before the forward and one ``latent_advance_`` (+ a store scatter) after sampling,
per distinct :class:`~monet.layout.SpanLayout` present in the batch — no host synchronisation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from monet import ops
from monet.layout import FORCE_START, SpanLayout
from monet.vllm.settings import EngineSettings, RequestSettings

logger = logging.getLogger("monet.vllm")


@dataclass
class _Req:
    slot: int
    settings: RequestSettings
    prompt_len: int
    initial_counter: int
    taken: bool = False


@dataclass
class FinishedLatents:
    req_id: str
    latents: torch.Tensor  # [n, D] float32 CPU
    overflow: bool


@dataclass
class _Store:
    by_tag: dict[str, list[str]] = field(default_factory=dict)  # tag -> req ids (live or finished)
    finished: dict[str, FinishedLatents] = field(default_factory=dict)


class LatentState:
    def __init__(self, settings: EngineSettings, *, hidden_size: int, dtype: torch.dtype, device: torch.device,
                 max_num_reqs: int, max_num_tokens: int) -> None:
        self.settings = settings
        self.D, self.dtype, self.device = hidden_size, dtype, device
        self.H = settings.max_latents_per_request
        self.max_num_reqs = max_num_reqs
        self.reqs: dict[str, _Req] = {}
        self._store = _Store()
        self._alloc(max_num_reqs + 8)
        self.slot_of_index = torch.full((max_num_reqs,), -1, dtype=torch.int64, device=device)
        self._slot_of_index_np = np.full((max_num_reqs,), -1, dtype=np.int64)
        self._row_slots = torch.full((max_num_tokens,), -1, dtype=torch.int64, device=device)
        self._zero_ids = torch.zeros((max_num_tokens,), dtype=torch.int64, device=device)
        self._last_req_ids: list[str] = []
        self._dirty = True
        self._combos: list[SpanLayout] = []
        # requests whose latents are replaced (ablation diagnostics): slot -> (ablation, noise generator)
        self._ablated: dict[int, tuple] = {}
        self.start_embedding: torch.Tensor | None = None  # set by the runner when an ablation needs it
        self._pending_init: list[tuple[int, int, int, bool]] = []  # slot, remaining, K, monet_v1

    # ------------------------------------------------------------------ slots
    def _alloc(self, S: int) -> None:
        dev, D = self.device, self.D
        self.S = S
        # one extra row (index S) is a dump row for store writes of rows that record nothing
        self.remaining = torch.zeros(S + 1, dtype=torch.int32, device=dev)
        self.prev_hidden = torch.zeros(S + 1, D, dtype=self.dtype, device=dev)
        self.k_of_slot = torch.ones(S + 1, dtype=torch.int32, device=dev)
        self.v1_of_slot = torch.zeros(S + 1, dtype=torch.bool, device=dev)
        self.n_latents = torch.zeros(S + 1, dtype=torch.int64, device=dev)
        self.store = torch.zeros(S + 1, self.H + 1, D, dtype=self.dtype, device=dev)
        self._free = list(range(S - 1, -1, -1))

    def _grow(self) -> None:
        old = (self.remaining, self.prev_hidden, self.k_of_slot, self.v1_of_slot, self.n_latents, self.store)
        S_old = self.S
        used = [r.slot for r in self.reqs.values()]
        self._alloc(2 * S_old)
        for new, prev in zip((self.remaining, self.prev_hidden, self.k_of_slot, self.v1_of_slot, self.n_latents,
                              self.store), old):
            new[:S_old].copy_(prev[:S_old])
        self._free = [s for s in range(self.S - 1, -1, -1) if s not in set(used)]

    def add_request(self, req_id: str, settings: RequestSettings, prompt_token_ids) -> None:
        if req_id in self.reqs:
            return
        if not self._free:
            self._grow()
        slot = self._free.pop()
        ids = prompt_token_ids if prompt_token_ids is not None else []
        layout = settings.layout
        if settings.force_start:
            initial = FORCE_START
        elif len(ids) and int(ids[-1]) == self.settings.start_id:
            # Only a raw engine prompt gets here (LatentLLM and `monet serve` strip a trailing START).
            initial = layout.counter_on_prompt_start
            if layout.monet_v1:
                logger.warning("request %s: the prompt ends with START as a prompt token; in monet-v1 START must "
                               "be stripped and forced (monet_force_start=true) to match a sampled START", req_id)
        else:
            initial = 0
        self.reqs[req_id] = _Req(slot, settings, len(ids), initial)
        if settings.ablation is not None:
            ab = settings.ablation
            self._ablated[slot] = (ab, torch.Generator().manual_seed(ab.seed) if ab.mode in ("noise", "perturb")
                                   else None)
        self._dirty = True
        self._pending_init.append((slot, initial, layout.latent_size, layout.monet_v1))
        if settings.return_latents and settings.tag is not None:
            self._store.by_tag.setdefault(settings.tag, []).append(req_id)

    def finish_request(self, req_id: str) -> None:
        req = self.reqs.pop(req_id, None)
        if req is None:
            return
        if req.settings.return_latents and req.settings.tag is not None and not req.taken:
            self._store.finished[req_id] = self._read(req_id, req)
        self._ablated.pop(req.slot, None)
        self._free.append(req.slot)
        self._dirty = True

    def _flush_init(self) -> None:
        if not self._pending_init:
            return
        slots, rem, ks, v1 = zip(*self._pending_init)
        self._pending_init.clear()
        idx = torch.tensor(slots, dtype=torch.int64).to(self.device, non_blocking=True)
        self.remaining.index_copy_(0, idx, torch.tensor(rem, dtype=torch.int32).to(self.device, non_blocking=True))
        self.k_of_slot.index_copy_(0, idx, torch.tensor(ks, dtype=torch.int32).to(self.device, non_blocking=True))
        self.v1_of_slot.index_copy_(0, idx, torch.tensor(v1, dtype=torch.bool).to(self.device, non_blocking=True))
        self.n_latents.index_fill_(0, idx, 0)

    def sync_batch(self, req_ids: list[str]) -> None:
        """Called once per step after vLLM updated its persistent batch."""
        self._flush_init()
        if not self._dirty and req_ids == self._last_req_ids:  # C-level compare; rebuild only on change
            return
        self._dirty = False
        n = len(req_ids)
        reqs = self.reqs
        self._slot_of_index_np[:n] = [reqs[r].slot if r in reqs else -1 for r in req_ids]
        self.slot_of_index[:n].copy_(torch.from_numpy(self._slot_of_index_np[:n]), non_blocking=True)
        self._combos = sorted({reqs[r].settings.layout for r in req_ids if r in reqs},
                              key=lambda lay: (lay.latent_size, lay.kind))
        self._last_req_ids = list(req_ids)

    # ------------------------------------------------------------------ per step
    def _per_combo(self, slots: torch.Tensor, by_kind: bool):
        """Yield (layout, slots masked to that layout). Without ``by_kind`` layouts that differ only
        in kind are merged (whether the next input is a latent depends on the latent size only)."""
        combos = self._combos
        if not by_kind:
            combos = sorted({SpanLayout(lay.latent_size) for lay in combos}, key=lambda lay: lay.latent_size)
        if len(combos) <= 1:
            for lay in combos:
                yield lay, slots
            return
        s = slots.clamp(min=0)
        for lay in combos:
            m = (slots >= 0) & (self.k_of_slot[s] == lay.latent_size)
            if by_kind:
                m &= self.v1_of_slot[s] == lay.monet_v1
            yield lay, torch.where(m, slots, -1)

    def batch_slots(self, num_reqs: int, discard: torch.Tensor) -> torch.Tensor:
        """Slot per persistent-batch row, -1 where the row's sampled token is discarded."""
        return torch.where(discard[:num_reqs], -1, self.slot_of_index[:num_reqs])

    def embed_(self, inputs_embeds: torch.Tensor, num_tokens: int, last_rows: torch.Tensor, slots: torch.Tensor) -> None:
        """Overwrite, for each request whose next input is a latent, the row of its newest token."""
        if not self._combos:
            return
        row_slots = self._row_slots[:num_tokens]
        row_slots.fill_(-1)
        row_slots.index_copy_(0, last_rows, slots)
        out = inputs_embeds[:num_tokens]
        for layout, s in self._per_combo(row_slots, by_kind=False):
            ops.latent_embed_(out, self._zero_ids[:num_tokens], s, self.remaining, self.prev_hidden, None, layout,
                              check_indices=False)

    def refeed_(self, inputs_embeds: torch.Tensor, rows: list[int], slots: list[int], ks: list[int]) -> None:
        """Write stored latents at re-computed latent positions (after preemption)."""
        if not rows:
            return
        dev = self.device
        r = torch.tensor(rows, dtype=torch.int64).to(dev)
        s = torch.tensor(slots, dtype=torch.int64).to(dev)
        k = torch.tensor(ks, dtype=torch.int64).to(dev)
        inputs_embeds.index_copy_(0, r, self.store[s, k].to(inputs_embeds.dtype))

    def advance_(self, sampled: torch.Tensor, hidden: torch.Tensor, slots: torch.Tensor) -> None:
        """Post-sample: force PAD/END inside spans (in ``sampled``, int32 [B] view, in place), open spans
        on START, update counters, store this step's hidden rows for the next latent inputs."""
        if not self._combos:
            return
        tokens = sampled.to(torch.int64)
        for layout, s in self._per_combo(slots, by_kind=True):
            ops.latent_advance_(tokens, hidden, s, self.remaining, self.prev_hidden, start_id=self.settings.start_id,
                                pad_id=self.settings.pad_id, end_id=self.settings.end_id, layout=layout,
                                check_indices=False)
        sampled.copy_(tokens)
        # record the latent each request will be fed next (in order, per slot)
        valid = slots >= 0
        s = torch.where(valid, slots, self.S)
        active = valid & SpanLayout.is_latent_input_per_slot(self.remaining[s], self.k_of_slot[s])
        n = self.n_latents[s]
        if self._ablated:
            self._ablate(s, active, n)
        col = torch.where(active, n.clamp(max=self.H), self.H)
        self.store[s, col] = self.prev_hidden[s]
        self.n_latents.index_add_(0, s, active.to(torch.int64))

    def _ablate(self, s: torch.Tensor, active: torch.Tensor, n: torch.Tensor) -> None:
        """Replace the next latent input of ablated requests (one host read; diagnostics only)."""
        from monet.model.latent_hooks import ablated_latent

        for slot, is_active, j in zip(s.tolist(), active.tolist(), n.tolist()):
            entry = self._ablated.get(slot)
            if entry is None or not is_active:
                continue
            ab, gen = entry
            if ab.mode == "start" and self.start_embedding is None:
                raise RuntimeError("latent ablation 'start' needs the START embedding (set by the runner)")
            self.prev_hidden[slot] = ablated_latent(ab, self.prev_hidden[slot], j, self.start_embedding, gen)

    @property
    def needs_start_embedding(self) -> bool:
        return self.start_embedding is None and any(ab.mode == "start" for ab, _ in self._ablated.values())

    # ------------------------------------------------------------------ re-prefill after preemption
    def refeed_plan(self, req_id: str, output_token_ids, num_computed: int, num_scheduled: int,
                    first_row: int) -> tuple[list[int], list[int], list[int], bool]:
        """Rows/slots/store indices to re-feed for a recomputed request; last value: more chunks follow."""
        req = self.reqs[req_id]
        pos = req.settings.layout.replay_latent_positions(output_token_ids, start_id=self.settings.start_id,
                                                          initial=req.initial_counter)
        newest = req.prompt_len + len(output_token_ids) - 1
        end = num_computed + num_scheduled
        rows, slots, ks = [], [], []
        for k, j in enumerate(pos):
            p = req.prompt_len + j
            if p >= newest:  # the newest token takes prev_hidden through embed_
                break
            if num_computed <= p < end:
                if k >= self.H:
                    raise RuntimeError(
                        f"request {req_id}: latent #{k} must be re-fed after preemption but only "
                        f"max_latents_per_request={self.H} are stored; raise it in additional_config['monet']")
                rows.append(first_row + p - num_computed)
                slots.append(req.slot)
                ks.append(k)
        return rows, slots, ks, end < newest

    # ------------------------------------------------------------------ results
    def _read(self, req_id: str, req: _Req) -> FinishedLatents:
        n = int(self.n_latents[req.slot])
        m = min(n, self.H)
        return FinishedLatents(req_id, self.store[req.slot, :m].to("cpu", torch.float32, copy=True), n > self.H)

    def take_latents(self, tags: list[str]) -> dict[str, list[FinishedLatents]]:
        """Latents of the requests carrying each tag (live or finished); forgets them."""
        out: dict[str, list[FinishedLatents]] = {}
        for tag in tags:
            got = []
            for rid in self._store.by_tag.pop(tag, []):
                if rid in self._store.finished:
                    got.append(self._store.finished.pop(rid))
                elif rid in self.reqs:
                    req = self.reqs[rid]
                    req.taken = True
                    got.append(self._read(rid, req))
            out[tag] = got
        return out
