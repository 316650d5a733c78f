"""``offload_reference``: the frozen reference waits on the CPU and visits the policy's device only
for the reference log-probability pass; the update is bit-identical to keeping it resident."""

from __future__ import annotations

import pytest
import torch

from monet.rl.actor import OFFLOAD_DEVICE, reference_on
from monet.rl.run_config import VLPORunConfig
from monet.rl.trainer import VLPOTrainer
from test_vlpo_trainer import ckpt, data, run_config  # noqa: F401  (module fixtures reused)


class RecordingModule(torch.nn.Linear):
    """A module that records the devices it is moved to (``Module.to``'s public signature)."""

    def __init__(self):
        super().__init__(3, 2)
        self.moves: list[str] = []

    def to(self, *args, **kwargs):
        self.moves.append(str(args[0] if args else kwargs["device"]))
        return super().to(*args, **kwargs)


def test_reference_on_moves_there_and_back_also_on_error():
    m = RecordingModule()
    w = m.weight.detach().clone()
    with reference_on(m, "cpu:0", OFFLOAD_DEVICE) as got:
        assert got is m and m.moves == ["cpu:0"]
    assert m.moves == ["cpu:0", "cpu"]
    with pytest.raises(RuntimeError, match="boom"):
        with reference_on(m, "cpu:0", OFFLOAD_DEVICE):
            raise RuntimeError("boom")
    assert m.moves == ["cpu:0", "cpu"] * 2  # moved back although the pass failed
    assert torch.equal(m.weight, w)


def _cfg(ckpt, data, out, **kw) -> VLPORunConfig:
    """test_vlpo_trainer's run with a KL term, so the reference's log-probs enter the update."""
    vlpo = dict(run_config(ckpt, data, out).vlpo.to_dict(), kl_coef=0.5)
    return run_config(ckpt, data, out, vlpo=vlpo, **kw)


def _two_steps(cfg: VLPORunConfig):
    """Two training steps; per step: the row, the reference's parameter devices seen by its forward
    passes and between steps; the final weights."""
    t = VLPOTrainer(cfg, printer=None)
    try:
        seen: list[set[str]] = []
        ref = t.reference  # the passes call its submodules (not its forward): hook the embedding
        hook = ref.get_input_embeddings().register_forward_pre_hook(
            lambda mod, args: seen.append({str(p.device) for p in ref.parameters()}))
        rows, between = [], []
        for _ in range(2):
            rows.append(t.step())
            between.append({str(p.device) for p in t.reference.parameters()} |
                           {str(b.device) for b in t.reference.buffers()})
        hook.remove()
        weights = {n: p.detach().cpu().clone() for n, p in t.policy.named_parameters()}
        return rows, seen, between, weights
    finally:
        t.close()


def _timing(key: str) -> bool:
    return key.startswith("time/") or key.endswith("_per_s")


def _same_update(a, b, exact: bool):
    rows_a, _, _, w_a = a
    rows_b, _, _, w_b = b
    for ra, rb in zip(rows_a, rows_b):
        assert ra["trained"] == rb["trained"] == 1
        keep = [k for k in ra if not _timing(k)]
        assert sorted(keep) == sorted(k for k in rb if not _timing(k))
        for k in keep:  # the KL metrics come from the reference log-probabilities
            if exact or not isinstance(ra[k], float):
                assert ra[k] == rb[k] or (ra[k] != ra[k] and rb[k] != rb[k]), k
            else:  # CUDA: two runs may differ in the order of floating-point sums (atomics)
                assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6, nan_ok=True), k
    assert rows_a[1]["text/kl"] > 0  # step 2: the policy has moved away from the reference
    for n in w_a:
        if exact:
            assert torch.equal(w_a[n], w_b[n]), n
        else:
            torch.testing.assert_close(w_a[n], w_b[n], rtol=1e-4, atol=1e-6, msg=n)


def test_offloaded_reference_gives_the_same_update(ckpt, data, tmp_path, device):
    """On the CPU the moves are no-ops: the check is that the offload path runs, gives the resident
    update bit for bit and leaves the reference on the offload device; on CUDA the reference must
    also be on the GPU during its passes and on the CPU between them."""
    dev = str(device)
    resident = _two_steps(_cfg(ckpt, data, tmp_path / "resident", device=dev))
    offloaded = _two_steps(_cfg(ckpt, data, tmp_path / "offloaded", device=dev, offload_reference=True))
    _same_update(resident, offloaded, exact=device.type == "cpu")
    _, seen_r, between_r, _ = resident
    rows, seen, between, _ = offloaded
    on_device = {str(torch.empty(0, device=device).device)}
    assert seen_r and all(s == on_device for s in seen_r) and between_r == [on_device] * 2
    assert seen and all(s == on_device for s in seen)  # the pass ran on the policy's device
    assert between == [{str(OFFLOAD_DEVICE)}] * 2  # and the reference waits on the CPU
    assert all("time/ref_offload" in r for r in rows) and not any("time/ref_offload" in r for r in resident[0])
