"""VLPO with Ray: one controller (the driver) drives the rollout engines and the training actor group.

::

    driver                          RolloutActor x rollout_engines   TrainerActor = rank 0 (VLPOTrainer)
    ------                          (LatentLLM or HF model copy)     + GroupWorker ranks 1..N-1
    prompts = trainer.next_round()  ---------------------------->    data cursor, sampling params
    shards = split_prompts(prompts, E)
    parts[e] = engine e.generate(shards[e])  (all at once) --> n samples per prompt, recorded latents
    ready = trainer.ingest(*parts)  ---------------------------->    merge_rounds (prompt order),
    ... until a batch is ready (or max_rounds_per_step) ...          rewards, difficulty sampling
    trains, batch = trainer.open_step()  (batch: an ObjectRef; the micro-batches stay in the store)
    rank.update(batch) on every rank --------------------------->    each rank: its share, old/ref
                                                                     log-probs, loss, optimiser step
    row = trainer.close_step()
    w = rank.weights() on every rank     (rank 0's ObjectRef; ZeRO-3 gathers collectively)
    engine e.load_weights(w), every e --> resolves w from the store (one put, every engine reads it),
                                          monet_load_weights on every vLLM worker, cache resets
    (every probe_every syncs: every engine and rank 0 decode probe requests greedily; the driver
     compares each engine with rank 0 and names an engine that disagrees)
    trainer.log_step(row, sync metrics); rank.save() on every rank every save_every steps

The training actor group (``train_workers`` ranks, :mod:`monet.rl.group`) is set up first: rank 0
takes the run lock, names the model directory (the starting model, or the checkpoint a resumed run
continues from) and the process group's address; every rank joins and loads its replica. The driver
calls a group method on every rank at once and raises the first failure at once
(:func:`monet.rl.group.wait_all`). The rollout engines (:class:`RolloutPool`) then start from the
same model directory, so after a resume every engine holds the checkpoint's weights. ``ray.init()``
starts a local Ray instance unless ``address`` names a cluster (``ray start --head`` on the first
node, ``ray start --address=HEAD:6379`` on the others; then ``monet vlpo --ray-address HEAD:6379``).

Data-parallel rollout (``rollout_engines`` E): each round's prompts are cut into E contiguous
shards (:func:`monet.rl.rollout.split_prompts`), every engine decodes its shard at the same time,
and rank 0 puts the parts back in prompt order (:func:`monet.rl.rollout.merge_rounds`) before
grading them: groups, advantages and the difficulty sampler see exactly the round one engine would
have produced, and with seeded sampling the rollouts are the same (per-request or per-prompt seeds,
never per call: :mod:`monet.rl.rollout`). The round's time is the slowest engine's, its tokens all
engines', so ``rollout/tokens_per_s`` is their summed throughput. The engines hold nothing but
weights: a checkpoint has no rollout state, and any E resumes any checkpoint.

Resources: every rollout engine asks for ``engine_kwargs.tensor_parallel_size`` GPUs and every rank
of the training group for one when ``device`` is a CUDA device (the rank then uses ``cuda``: Ray
sets its visible devices); on CPU every actor asks for ``cpus_per_actor`` (fractional by default,
so two rollout engines and a training rank fit a 2-core machine). A run that needs more than the
cluster has is refused before any actor starts (:func:`check_resources`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from monet.rl.run_config import VLPORunConfig


def _actors(ray: Any):
    @ray.remote
    class RolloutActor:
        """Rollout engine ``engine_index`` (``LatentLLM``, or ``monet.generate`` on its own model copy)."""

        def __init__(self, cfg_dict: dict, model_dir: str, engine_index: int = 0):
            import monet
            from monet.rl.rollout import HFRolloutEngine
            from monet.rl.trainer import build_engine

            self.cfg = VLPORunConfig.from_dict(cfg_dict)
            self.index = engine_index
            if self.cfg.engine == "hf":
                model, processor = monet.load_model(model_dir, dtype=self.cfg.dtype, device=self.cfg.device)
                self.engine = HFRolloutEngine(model, processor)
                self.processor = processor
            else:
                _reap_group_on_exit()  # before vLLM starts its engine processes
                self.engine = build_engine(self.cfg, model_dir, None, None, engine_index=engine_index)
                self.processor = self.engine.processor

        def ready(self) -> int:
            return self.index

        def generate(self, prompts, sampling, round_index: int):
            from monet.rl.rollout import generate_rollouts

            c = self.cfg
            return generate_rollouts(self.engine, self.processor, prompts, n=c.vlpo.n, sampling=sampling,
                                     latent_noise=c.vlpo.latent_noise, run_seed=c.seed, round_index=round_index,
                                     latent_size=c.latent_size, layout=c.layout)

        def load_weights(self, weights) -> dict:
            import time

            import torch

            from monet.rl.rollout import HFRolloutEngine
            from monet.rl.weight_sync import load_into_engine, weights_nbytes

            if isinstance(self.engine, HFRolloutEngine):
                t0 = time.perf_counter()
                params = dict(self.engine.model.named_parameters())
                with torch.no_grad():
                    for name, t in weights:
                        params[name].copy_(t)
                return {"time/sync": time.perf_counter() - t0, "sync/bytes": float(weights_nbytes(weights))}
            rep = load_into_engine(self.engine, weights)
            return {"time/sync": rep.seconds, "sync/bytes": float(rep.bytes)}

        def probe(self, requests, kw: dict):
            from monet.rl.rollout import HFRolloutEngine
            from monet.rl.weight_sync import hf_generate, probe_generations

            if isinstance(self.engine, HFRolloutEngine):  # its own model copy, decoded by monet.generate
                return probe_generations(hf_generate(self.engine.model, self.processor), requests, **kw)
            return probe_generations(self.engine.generate, requests, **kw)

        def engine_weights(self):
            """``[(name, CPU tensor)]``: the parameters this engine decodes with (HF engine only; a vLLM
            engine keeps them in its own fused, sharded layout: check it with the probe)."""
            from monet.rl.rollout import HFRolloutEngine
            from monet.rl.weight_sync import named_weights

            if not isinstance(self.engine, HFRolloutEngine):
                raise NotImplementedError(f"rollout engine {self.index}: a vLLM engine's weights are not readable "
                                          "by Hugging Face name; compare engines with the probe (probe_every)")
            return named_weights(self.engine.model, trainable_only=False)

        def shutdown(self) -> None:
            if hasattr(self.engine, "shutdown"):
                self.engine.shutdown()

    @ray.remote
    class TrainerActor:
        """Rank 0 of the training actor group (:mod:`monet.rl.group`): a
        :class:`~monet.rl.trainer.VLPOTrainer` without an engine (data, rewards, sampler, metrics,
        checkpoints) and its share of every update."""

        def __init__(self, cfg_dict: dict, resume: bool):
            from monet.rl import checkpoint as ckpt_io
            from monet.rl.group import free_port, needs_process_group, node_address

            self.cfg = VLPORunConfig.from_dict(cfg_dict)
            self.resume = resume
            self.lock = ckpt_io.RunLock(self.cfg.output_dir)  # before anything is read from output_dir
            self.start = ckpt_io.latest_checkpoint(self.cfg.output_dir) if resume else None
            self.address = (node_address(), free_port()) if needs_process_group(self.cfg) else None
            self.t = None
            self._row: dict | None = None
            self._result = None
            self._probe_weights = None
            self._probe_model = None

        def rendezvous(self):
            """``(address, port)`` of the process group (None without one), the model directory every
            rank loads and the checkpoint resumed (None: a fresh start)."""
            start = str(self.start) if self.start is not None else None
            return self.address, start or self.cfg.model, start

        def setup(self) -> None:
            from monet.rl.group import init_process_group
            from monet.rl.trainer import VLPOTrainer

            dist = None
            if self.address is not None:
                dist = init_process_group(0, self.cfg.train_workers, *self.address, self.cfg.device)
            self.t = VLPOTrainer(self.cfg, resume=self.resume, with_engine=False, lock=self.lock, dist=dist)

        def state(self) -> tuple[int, int]:
            return self.t.step_count, self.t.cfg.steps

        def begin_step(self) -> bool:
            self.t.begin_step()
            return self.t.sampler.ready()

        def next_round(self):
            prompts = self.t.next_prompts()
            return prompts, self.t.sampling(), self.t.round_index

        def ingest(self, *parts) -> bool:
            """Grade a round given as the rollout engines' parts, in shard order (Ray resolves each)."""
            from monet.rl.rollout import merge_rounds

            return self.t.ingest(merge_rounds(parts))

        @ray.method(num_returns=2)
        def open_step(self, rounds: int):
            """Whether the step trains, and the collated training batch (None when it does not)."""
            self._row, batch = self.t.open_step(rounds)
            self._result = None
            return batch is not None, batch

        def update(self, batch) -> None:
            self._result = self.t.update(batch)

        def close_step(self) -> dict:
            return self.t.close_step(self._row, self._result)

        def weights(self):
            w = self.t.weights()
            if self.t.actor.zero3 and self.cfg.probe_every:
                self._probe_weights = w  # the partitioned policy cannot decode alone: the probe uses a copy
            return w

        def probe_due(self) -> bool:
            return bool(self.t.cfg.probe_every) and self.t.step_count % self.t.cfg.probe_every == 0

        def probe_requests(self):
            return self.t.probe_requests(), self.t.probe_kwargs()

        def probe(self, requests, kw: dict):
            import torch

            from monet.rl.weight_sync import hf_generate, probe_generations

            model = self.t.policy
            if self.t.actor.zero3:  # a whole copy holding the weights just gathered and sent
                import monet

                if self._probe_model is None:
                    self._probe_model = monet.load_model(self.cfg.model, dtype=self.cfg.dtype,
                                                         device=self.cfg.device)[0].eval()
                params = dict(self._probe_model.named_parameters())
                with torch.no_grad():
                    for name, t in self._probe_weights:
                        params[name].copy_(t)
                model = self._probe_model
            return probe_generations(hf_generate(model, self.t.processor), requests, **kw)

        def log_step(self, row: dict, extra: dict) -> dict:
            return self.t.log_step(row, extra)

        def save_due(self) -> bool:
            return self.t.save_due() or self.t.step_count >= self.t.cfg.steps

        def save(self, step: int) -> None:
            if step != self.t.step_count:  # the driver and rank 0 must agree on the folder the ranks write
                raise RuntimeError(f"save of step {step} asked of a trainer at step {self.t.step_count}")
            self.t.save()

        def close(self) -> None:
            from monet.rl.group import leave_process_group

            try:
                if self.t is not None:
                    self.t.close()
                else:
                    self.lock.release()
            finally:
                leave_process_group()

    return RolloutActor, TrainerActor


class RolloutPool:
    """The data-parallel rollout engines as the driver sees them: ``actors[e]`` is engine ``e`` (a
    ``RolloutActor``). Every method starts its calls on all engines at once and returns the
    ObjectRefs (the caller waits on them, possibly together with calls to the training group)."""

    def __init__(self, ray: Any, actors: Sequence[Any]):
        if not actors:
            raise ValueError("a rollout pool needs at least one engine")
        self.ray, self.actors = ray, list(actors)

    @classmethod
    def start(cls, ray: Any, cfg: VLPORunConfig, model_dir: str, *, cpus_per_actor: float = 0.5,
              cfg_dict: dict | None = None) -> "RolloutPool":
        """``cfg.rollout_engines`` engines on ``model_dir``, each with its own resources
        (``tensor_parallel_size`` GPUs on CUDA, ``cpus_per_actor`` CPUs otherwise); returns once every
        engine is up (the first that fails to start raises). ``cfg_dict``: the config as the actors
        get it (``run_vlpo_ray`` sets ``device: cuda``)."""
        from monet.rl.group import wait_all

        RolloutActor = _actors(ray)[0]
        cuda = cfg.device.startswith("cuda")
        tp = int(cfg.engine_kwargs.get("tensor_parallel_size", 1))
        # the latent runner needs vLLM's V1 model runner on GPU (LatentLLM refuses V2 with a clear error)
        env = {"env_vars": {"VLLM_USE_V2_MODEL_RUNNER": "0"}} if cuda and cfg.engine == "vllm" else None
        d = cfg.to_dict() if cfg_dict is None else cfg_dict
        actors = [RolloutActor.options(num_cpus=cpus_per_actor, num_gpus=tp if cuda else 0, runtime_env=env)
                  .remote(d, model_dir, e) for e in range(cfg.rollout_engines)]
        pool = cls(ray, actors)
        ready = [a.ready.remote() for a in actors]
        try:
            wait_all(ray, ready)
        except Exception as err:
            failed = [e for e, r in enumerate(ready) if ray.wait([r], timeout=0)[0] and _raises(ray, r)]
            pool.kill()
            if not failed:
                raise
            raise RuntimeError(f"rollout engine {failed[0]} of {len(actors)} did not start on {model_dir}: "
                               f"{err}") from err
        except BaseException:
            pool.kill()
            raise
        return pool

    def __len__(self) -> int:
        return len(self.actors)

    def generate(self, prompts: Sequence[Any], sampling: Any, round_index: int) -> list:
        """One rollout round: engine ``e`` decodes the ``e``-th contiguous shard of ``prompts``
        (:func:`monet.rl.rollout.split_prompts`); the parts' refs in shard order (engines without
        a shard are left out), for :func:`monet.rl.rollout.merge_rounds`."""
        from monet.rl.rollout import split_prompts

        return [a.generate.remote(shard, sampling, round_index)
                for a, shard in zip(self.actors, split_prompts(list(prompts), len(self.actors))) if shard]

    def load_weights(self, weights: Any) -> list:
        """Every engine loads ``weights`` (one ObjectRef: one copy in the store, read by each)."""
        return [a.load_weights.remote(weights) for a in self.actors]

    def probe(self, requests: Sequence[Any], kw: dict) -> list:
        """Every engine decodes the probe requests greedily (:func:`monet.rl.weight_sync.probe_generations`)."""
        return [a.probe.remote(list(requests), kw) for a in self.actors]

    def engine_weights(self) -> list:
        """Every engine's parameters (HF engines only; ``RolloutActor.engine_weights``)."""
        return [a.engine_weights.remote() for a in self.actors]

    def shutdown(self) -> list:
        return [a.shutdown.remote() for a in self.actors]

    def kill(self) -> None:
        for a in self.actors:
            self.ray.kill(a)


def check_resources(cfg: VLPORunConfig, cluster: dict, cpus_per_actor: float) -> None:
    """Refuse a run the Ray cluster can never place (Ray would wait for the resources forever):
    ``train_workers`` ranks of one GPU each and ``rollout_engines`` engines of
    ``tensor_parallel_size`` GPUs each on CUDA; ``cpus_per_actor`` CPUs for every actor.
    ``cluster``: ``ray.cluster_resources()`` (the cluster's total, free or not)."""
    engines, ranks = cfg.rollout_engines, cfg.train_workers
    tp = int(cfg.engine_kwargs.get("tensor_parallel_size", 1))
    cpus = cpus_per_actor * (ranks + engines)
    if cpus > float(cluster.get("CPU", 0.0)) + 1e-9:
        raise ValueError(f"the run needs {cpus:g} CPUs (cpus_per_actor={cpus_per_actor:g} for each of {ranks} training "
                         f"rank(s) and {engines} rollout engine(s)) but the Ray cluster has "
                         f"{float(cluster.get('CPU', 0.0)):g}; lower train_workers, rollout_engines or cpus_per_actor")
    if cfg.device.startswith("cuda"):
        gpus = ranks + engines * tp
        if gpus > float(cluster.get("GPU", 0.0)) + 1e-9:
            raise ValueError(f"the run needs {gpus} GPUs ({ranks} training rank(s) of one GPU, {engines} rollout "
                             f"engine(s) of tensor_parallel_size={tp}) but the Ray cluster has "
                             f"{float(cluster.get('GPU', 0.0)):g}; lower train_workers, rollout_engines or "
                             "tensor_parallel_size, or add nodes")


# Watches the process whose pid is argv[1]; once it is gone (this watcher is re-parented), kills
# the process group argv[2], which the watched process leads.
_REAPER = ("import os, signal, sys, time\n"
           "parent, group = int(sys.argv[1]), int(sys.argv[2])\n"
           "while os.getppid() == parent:\n"
           "    time.sleep(0.5)\n"
           "os.killpg(group, signal.SIGKILL)\n")


def _reap_group_on_exit() -> None:
    """Make this process's descendants die with it, however it dies (Linux; a no-op elsewhere).

    vLLM runs its engine in child processes that outlive a rollout actor killed without a
    shutdown: a SIGKILLed ``monet vlpo`` driver takes Ray's raylet with it, the actors exit at
    once, and the orphaned engine would keep its memory (on GPU: its share of the device) while a
    resumed run starts another. A Ray worker leads its own process group, which its children
    join; a small watcher process in that group polls its parent and, once the actor is gone,
    kills the group (itself included). Nothing is armed unless this process leads its group, so no
    other process can ever be hit."""
    import os
    import subprocess
    import sys

    if not hasattr(os, "killpg") or os.getpgid(0) != os.getpid():
        return
    subprocess.Popen([sys.executable, "-c", _REAPER, str(os.getpid()), str(os.getpgid(0))],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)


def _raises(ray: Any, ref: Any) -> bool:
    try:
        ray.get(ref)
    except Exception:
        return True
    return False


def sync_metrics(reports: Sequence[dict]) -> dict:
    """The step's sync metrics from every engine's ``load_weights`` report: ``time/sync`` the slowest
    engine's (they load at the same time), ``sync/bytes`` the size of the weights sent (the same
    object for every engine)."""
    return {"time/sync": max(r["time/sync"] for r in reports), "sync/bytes": reports[0]["sync/bytes"]}


def run_vlpo_ray(cfg: VLPORunConfig, *, resume: bool = False, address: str | None = None,
                 cpus_per_actor: float = 0.5, printer: Callable[[str], None] = print) -> list[dict]:
    """Run VLPO until ``cfg.steps`` with ``cfg.rollout_engines`` rollout engines and the training
    actor group of ``cfg.train_workers`` ranks (module docstring); returns the step rows. ``printer``
    (None: silent) gets the driver's messages (a rollout engine failing the weight probe)."""
    try:
        import ray
    except ImportError:
        raise ImportError("the Ray controller needs ray (pip install 'ray[default]>=2.60,<2.61', or the "
                          "package's [rl] extra); without it use --controller local") from None
    from monet.rl.group import GroupWorker, wait_all

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
    try:
        check_resources(cfg, ray.cluster_resources(), cpus_per_actor)
    except ValueError:
        if started:
            ray.shutdown()
        raise
    _, TrainerActor = _actors(ray)
    Worker = ray.remote(GroupWorker)
    cuda = cfg.device.startswith("cuda")
    d = cfg.to_dict()
    if cuda:
        d["device"] = "cuda"  # Ray makes the actor's GPU visible as device 0
    gpus = 1 if cuda else 0
    trainer = TrainerActor.options(num_cpus=cpus_per_actor, num_gpus=gpus).remote(d, resume)
    ranks, pool, ok = [trainer], None, False
    try:
        group_address, policy_dir, checkpoint = ray.get(trainer.rendezvous.remote())
        workers = [Worker.options(num_cpus=cpus_per_actor, num_gpus=gpus).remote(d, r)
                   for r in range(1, cfg.train_workers)]
        ranks += workers
        wait_all(ray, [trainer.setup.remote()] + [w.setup.remote(*group_address, policy_dir, checkpoint)
                                                  for w in workers])
        pool = RolloutPool.start(ray, cfg, policy_dir, cpus_per_actor=cpus_per_actor, cfg_dict=d)
        rows = _loop(ray, cfg, trainer, workers, pool, printer)
        ok = True
        return rows
    finally:
        try:
            # after a failure a rank may be stuck in a collective: it is killed without a close (its run
            # lock dies with it); the rollout engines are always shut down (their vLLM processes)
            closing = [r.close.remote() for r in ranks] if ok else []
            if pool is not None:
                closing += pool.shutdown()
            if closing:
                ray.wait(closing, num_returns=len(closing), timeout=120)
        finally:
            for a in ranks + (pool.actors if pool is not None else []):
                ray.kill(a)
            if started:
                ray.shutdown()


def _loop(ray: Any, cfg: VLPORunConfig, trainer: Any, workers: list, pool: RolloutPool,
          printer: Callable[[str], None] | None) -> list[dict]:
    """The driver's loop (module docstring)."""
    from monet.rl.group import wait_all

    ranks = [trainer, *workers]
    rows = []
    step, total = ray.get(trainer.state.remote())
    while step < total:
        ready = ray.get(trainer.begin_step.remote())
        rounds = 0
        while not ready and rounds < cfg.max_rounds_per_step:
            prompts, sampling, round_index = ray.get(trainer.next_round.remote())
            parts = pool.generate(prompts, sampling, round_index)
            ready = ray.get(trainer.ingest.remote(*parts))  # the parts go actor to actor via the store
            del parts
            rounds += 1
        trains, batch = trainer.open_step.remote(rounds)
        if ray.get(trains):  # every rank reads the one stored batch
            wait_all(ray, [r.update.remote(batch) for r in ranks])
        del batch
        row = ray.get(trainer.close_step.remote())
        extra = {}
        if row["trained"]:
            weights = [r.weights.remote() for r in ranks]  # rank 0's: the full weights, in the store
            loads = pool.load_weights(weights[0])
            extra = sync_metrics(wait_all(ray, [*loads, *weights])[:len(loads)])
            del weights
            if ray.get(trainer.probe_due.remote()):
                from monet.rl.weight_sync import compare_engine_probes

                reqs, kw = ray.get(trainer.probe_requests.remote())
                ours = pool.probe(reqs, kw)
                ref = trainer.probe.remote(reqs, kw)
                metrics, failures = compare_engine_probes(wait_all(ray, ours), ray.get(ref))
                extra.update(metrics)
                for msg in failures:
                    if printer is not None:
                        printer(f"[vlpo] step {row['step']}: weight probe: {msg}")
        rows.append(ray.get(trainer.log_step.remote(row, extra)))
        step = row["step"]
        if ray.get(trainer.save_due.remote()):
            wait_all(ray, [r.save.remote(step) for r in ranks])
    return rows
