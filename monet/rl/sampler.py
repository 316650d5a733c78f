"""Online difficulty sampling: train only on prompts the policy sometimes, but not mostly, solves.

Each finished rollout group (one prompt, n rollouts, per-rollout accuracy in [0, 1]) is offered
once. Its accuracy ``a = sum(accuracies) / n`` decides:

* ``a == 0``: discarded (``all_wrong``: no rollout earned a positive advantage to learn from);
* ``a > select_acc_threshold``: discarded (``too_easy``);
* otherwise (``0 < a <= threshold``) kept in a FIFO buffer, unless the buffer already holds
  ``buffer_groups`` groups (then dropped, counted as ``overflow``).

With ``filter=False`` every group is kept (only the buffer and its capacity apply).

:meth:`DifficultySampler.pop_batch` hands out the oldest ``groups_per_batch`` kept groups once that
many are waiting. The whole state (settings, buffer, cumulative counters) round-trips through JSON
(:meth:`state_dict` / :meth:`from_state`) so a resumed run continues exactly; group payloads must
therefore be JSON values (e.g. a key into the rollout store, not tensors).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from monet.rl.config import VLPOConfig

Decision = Literal["kept", "all_wrong", "too_easy", "overflow"]
STATE_VERSION = 1
_COUNTERS = ("offered", "kept", "all_wrong", "too_easy", "overflow", "batches")


@dataclass(frozen=True)
class GroupRecord:
    """One prompt's rollout group: ``group_id``, per-rollout ``accuracies``, opaque JSON ``payload``."""

    group_id: str
    accuracies: tuple[float, ...]
    payload: Any = None

    @property
    def accuracy(self) -> float:
        return math.fsum(self.accuracies) / len(self.accuracies)


@dataclass
class DifficultySampler:
    """Stateful filter + accumulator (module docstring). Counters are cumulative since creation."""

    groups_per_batch: int
    buffer_groups: int
    select_acc_threshold: float = 0.6
    buffer: list[GroupRecord] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {k: 0 for k in _COUNTERS})
    filter: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.groups_per_batch, bool) or not isinstance(self.groups_per_batch, int) \
                or self.groups_per_batch < 1:
            raise ValueError(f"groups_per_batch must be an int >= 1, got {self.groups_per_batch!r}")
        if isinstance(self.buffer_groups, bool) or not isinstance(self.buffer_groups, int) \
                or self.buffer_groups < self.groups_per_batch:
            raise ValueError(f"buffer_groups must be an int >= groups_per_batch ({self.groups_per_batch}), "
                             f"got {self.buffer_groups!r}")
        thr = self.select_acc_threshold
        if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0 < thr <= 1:
            raise ValueError(f"select_acc_threshold must be in (0, 1], got {thr!r}")
        if len(self.buffer) > self.buffer_groups:
            raise ValueError(f"buffer holds {len(self.buffer)} groups, more than buffer_groups={self.buffer_groups}")
        if set(self.counts) != set(_COUNTERS):
            raise ValueError(f"counts must have exactly the keys {list(_COUNTERS)}, got {sorted(self.counts)}")

    @classmethod
    def from_config(cls, config: VLPOConfig, *, filter: bool = True) -> "DifficultySampler":
        """``filter=False`` keeps every group (accumulation only, no difficulty sampling)."""
        return cls(config.groups_per_batch, config.buffer_groups, config.select_acc_threshold, filter=filter)

    # ------------------------------------------------------------------ filtering
    def decide(self, accuracies: "list[float] | tuple[float, ...]") -> Decision:
        """The decision for a group with these accuracies, ignoring buffer capacity (pure)."""
        a = math.fsum(accuracies) / len(accuracies)
        if not self.filter:
            return "kept"
        if a <= 0:
            return "all_wrong"
        if a > self.select_acc_threshold:
            return "too_easy"
        return "kept"

    def offer(self, group_id: str, accuracies: "list[float] | tuple[float, ...]", payload: Any = None) -> Decision:
        """Offer one finished group; returns what happened to it and updates the counters."""
        if not isinstance(group_id, str):
            raise TypeError(f"group_id must be a str, got {group_id!r}")
        accs = tuple(accuracies)
        if not accs:
            raise ValueError(f"group {group_id!r}: no rollouts")
        for i, a in enumerate(accs):
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1:
                raise ValueError(f"group {group_id!r}, rollout {i}: accuracy must be a number in [0, 1], got {a!r}")
        decision = self.decide(accs)
        if decision == "kept" and len(self.buffer) >= self.buffer_groups:
            decision = "overflow"
        self.counts["offered"] += 1
        self.counts[decision] += 1
        if decision == "kept":
            self.buffer.append(GroupRecord(group_id, tuple(float(a) for a in accs), payload))
        return decision

    # ------------------------------------------------------------------ batches
    def ready(self) -> bool:
        return len(self.buffer) >= self.groups_per_batch

    def pop_batch(self) -> list[GroupRecord]:
        """The oldest ``groups_per_batch`` kept groups (FIFO); ``RuntimeError`` when not ready."""
        if not self.ready():
            raise RuntimeError(f"only {len(self.buffer)} of {self.groups_per_batch} groups are waiting; "
                               "offer more groups first (check ready())")
        batch, self.buffer = self.buffer[: self.groups_per_batch], self.buffer[self.groups_per_batch:]
        self.counts["batches"] += 1
        return batch

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        """A JSON-serialisable snapshot; ``TypeError`` naming the group whose payload is not JSON."""
        groups = []
        for g in self.buffer:
            try:
                json.dumps(g.payload, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise TypeError(f"group {g.group_id!r}: payload is not JSON-serialisable ({e})") from None
            groups.append({"group_id": g.group_id, "accuracies": list(g.accuracies), "payload": g.payload})
        return {"version": STATE_VERSION, "groups_per_batch": self.groups_per_batch,
                "buffer_groups": self.buffer_groups, "select_acc_threshold": self.select_acc_threshold,
                "counts": dict(self.counts), "buffer": groups, "filter": self.filter}

    @classmethod
    def from_state(cls, state: dict) -> "DifficultySampler":
        """Rebuild from :meth:`state_dict` output (e.g. after ``json.loads``)."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            v = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"difficulty sampler state: unsupported version {v!r} (expected {STATE_VERSION})")
        try:
            buffer = [GroupRecord(g["group_id"], tuple(float(a) for a in g["accuracies"]), g.get("payload"))
                      for g in state["buffer"]]
            return cls(state["groups_per_batch"], state["buffer_groups"], state["select_acc_threshold"],
                       buffer, {k: int(v) for k, v in state["counts"].items()}, bool(state.get("filter", True)))
        except KeyError as e:
            raise ValueError(f"difficulty sampler state: missing field {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.state_dict(), allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "DifficultySampler":
        return cls.from_state(json.loads(text))
