"""The training actor group of the Ray controller: ``train_workers`` processes that run one
:class:`monet.rl.actor.Actor` update together, data parallel or with DeepSpeed ZeRO-2/3.

Ranks: rank 0 is the controller's trainer actor (a :class:`monet.rl.trainer.VLPOTrainer`: data,
rewards, difficulty sampling, metrics, checkpoints, and its own share of every update); ranks
``1 .. N-1`` are :class:`GroupWorker` s, each holding only a policy replica (policy, frozen
reference, :class:`~monet.rl.actor.Actor`). Each rank is a Ray actor with one device (a GPU when
``device`` is CUDA, else CPU); together they form one ``torch.distributed`` process group (nccl on
CUDA, gloo on CPU). The driver (:func:`monet.rl.controller.run_vlpo_ray`) calls the same method on
every rank at once and waits for all of them (:func:`wait_all`, which raises the first failure at
once: the other ranks may be blocked in a collective that will never complete)::

    setup    rank 0 takes the run lock, finds the checkpoint to resume (if any), picks its node's
             address and a free port; every rank joins the process group at tcp://ADDRESS:PORT and
             loads its replica from the same model directory (the starting model or that
             checkpoint): plain data parallel broadcasts rank 0's weights, DeepSpeed builds its
             engine; resuming restores the optimiser on every rank (monet.rl.checkpoint).
    update   rank 0 pops a training batch and collates it into micro-batches on the CPU; the
             driver passes that one object-store object to every rank (Ray resolves it in each
             process: one put, N readers); each rank moves it to its device and runs
             Actor.update on its share (monet.rl.actor.rank_share), old and reference
             log-probabilities included. Rank 0's metrics are the step's (already combined over
             the ranks inside the update).
    weights  the full weights for the rollout engine: ZeRO-3 gathers them (every rank enters
             Actor.full_weights; rank 0 copies them to the CPU); otherwise rank 0's replica is
             whole. They go to the rollout actor through the object store (load_weights).
    save     DeepSpeed: every rank writes its optimiser shard into the staging folder of
             checkpoint-STEP, then the weights are gathered and rank 0 completes and renames the
             folder (one atomic checkpoint); plain: the ranks first compare checksums of their
             weights and AdamW state (they must be identical), then rank 0 writes alone.

With one worker and no DeepSpeed there is no process group and rank 0 trains alone: the update
is exactly the single-process trainer's. ``N`` ranks compute the same gradients up to the order
of floating-point sums (and ZeRO-3 keeps fp32 master weights only partitioned). Only rank 0 owns
random state (rollout seeds, the data order); the update itself draws no random numbers.

Multi-node: Ray places the ranks (one device each) anywhere in the cluster; rank 0's node address
must be reachable from the other ranks' nodes, and ``output_dir`` and the model directory must be
the same shared path on every node that holds a rank (every DeepSpeed rank writes its shard into
the checkpoint; every rank reads the checkpoint it resumes).
"""

from __future__ import annotations

import os
import socket
from typing import Any, Sequence

import torch

from monet.rl import checkpoint as ckpt_io
from monet.rl.actor import load_replica
from monet.rl.run_config import VLPORunConfig
from monet.train.distributed import DistInfo, join_process_group


def needs_process_group(cfg: VLPORunConfig) -> bool:
    """Several workers, or DeepSpeed (whose engine needs a process group even for one rank)."""
    return cfg.train_workers > 1 or bool(cfg.deepspeed)


def node_address() -> str:
    """This node's address as Ray knows it (the one other nodes of the cluster reach it at)."""
    import ray

    return ray.util.get_node_ip_address()


def free_port() -> int:
    """A TCP port free on this node right now (the kernel picks it; rank 0's store binds it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def init_process_group(rank: int, world_size: int, address: str, port: int, device: str) -> DistInfo:
    """Join the actor group's process group at ``tcp://address:port`` as ``rank`` of ``world_size``
    (:func:`monet.train.distributed.join_process_group`, as torchrun runs do): gloo on CPU; with a
    CUDA ``device`` nccl for CUDA tensors and gloo for the small CPU tensors the actor reduces
    (action counts, metrics, replica checksums). Each rank is a Ray actor with its devices made
    visible by Ray, so its local rank is 0.

    DeepSpeed reads the launcher's variables (``LOCAL_RANK`` above all) from the environment; they
    are set here, in this worker process, to the values passed explicitly (nothing else reads them)."""
    os.environ.update({"MASTER_ADDR": address, "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0"})
    join_process_group(device, local_rank=0, init_method=f"tcp://{address}:{port}", rank=rank,
                       world_size=world_size)
    return DistInfo(rank, world_size, 0)


def leave_process_group() -> None:
    """Destroy this process's group (no barrier: a failed rank must not keep the others waiting)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class GroupWorker:
    """Rank ``rank >= 1`` of the actor group (module docstring): a policy replica and its
    :class:`~monet.rl.actor.Actor`; no data, rollouts, metrics or run lock. The Ray controller
    runs it as an actor (``ray.remote(GroupWorker)``)."""

    def __init__(self, cfg_dict: dict, rank: int):
        self.cfg = VLPORunConfig.from_dict(cfg_dict)
        if not 1 <= rank < self.cfg.train_workers:
            raise ValueError(f"a group worker's rank must be in [1, {self.cfg.train_workers}), got {rank}")
        self.rank = rank
        self.replica: Any = None

    def setup(self, address: str, port: int, policy_dir: str, checkpoint: str | None) -> None:
        """Join the process group and load the replica from ``policy_dir`` (``checkpoint``: the
        checkpoint rank 0 resumes, whose optimiser state this rank restores; None: a fresh start from
        ``cfg.model``). Collective: every rank at once."""
        dist = init_process_group(self.rank, self.cfg.train_workers, address, port, self.cfg.device)
        self.dist = dist
        self.replica = load_replica(self.cfg, policy_dir, fresh=checkpoint is None, dist=dist)
        if checkpoint is not None:
            _, state, tensors = ckpt_io.load_state(checkpoint)
            ckpt_io.restore_actor_optimizer(self.replica.actor, checkpoint, state, tensors, dist.world_size)

    def update(self, batch: Sequence[tuple[Any, torch.Tensor]]) -> None:
        """This rank's share of the update on the whole collated ``batch`` (rank 0 reports the metrics)."""
        self.replica.actor.update_batch(batch)

    def weights(self) -> None:
        """Take part in gathering the full weights (collective under ZeRO-3; rank 0 copies them)."""
        with self.replica.actor.full_weights():
            pass

    def save(self, step: int) -> None:
        """Take part in writing ``checkpoint-STEP``: with DeepSpeed this rank's optimiser shard into the
        staging folder, then the weight gathering; plain: the replica comparison
        (:meth:`monet.rl.actor.Actor.check_replicas`; rank 0 writes the checkpoint alone)."""
        self.replica.actor.check_replicas()
        engine = self.replica.actor.engine
        if engine is not None:
            ckpt_io.save_engine_shards(engine, self.cfg.output_dir, step)
        with self.replica.actor.full_weights():
            pass

    def close(self) -> None:
        engine = self.replica.actor.engine if self.replica is not None else None
        if engine is not None and hasattr(engine, "destroy"):
            engine.destroy()
        leave_process_group()


def wait_all(ray: Any, refs: Sequence[Any], timeout: float | None = None) -> list:
    """The results of ``refs`` (one call per rank); the first failure is raised as soon as it
    happens instead of after every rank has finished (a rank whose peer failed may be waiting in a
    collective that never completes). ``timeout``: seconds for all of them (``GetTimeoutError``)."""
    import time

    pending = list(refs)
    deadline = None if timeout is None else time.monotonic() + timeout
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, pending = ray.wait(pending, num_returns=1, timeout=left)
        if not done:
            raise ray.exceptions.GetTimeoutError(f"{len(pending)} of {len(refs)} ranks did not answer within "
                                                 f"{timeout} s")
        ray.get(done)  # raises that rank's error
    return ray.get(list(refs))
