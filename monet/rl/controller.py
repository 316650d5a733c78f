"""VLPO with Ray: one controller (the driver) drives a rollout actor and a trainer actor.

::

    driver                      RolloutActor (LatentLLM)          TrainerActor (VLPOTrainer)
    ------                      ------------------------          --------------------------
    prompts = trainer.next_round()  ---------------------------->  data cursor, sampling params
    rnd = rollout.generate(prompts) -->  n samples per prompt,
                                         recorded latents
    ready = trainer.ingest(rnd)     ---------------------------->  rewards, difficulty sampling
    ... until a batch is ready (or max_rounds_per_step) ...
    row = trainer.finish_step()     ---------------------------->  old/ref log-probs, update
    w = trainer.weights()           (an ObjectRef: the tensors stay in Ray's object store)
    rollout.load_weights(w)         -->  resolves w from the store,
                                         monet_load_weights on every
                                         vLLM worker, cache resets
    (every probe_every syncs: both actors decode probe requests greedily; the driver compares)
    trainer.log_step(row, sync metrics), trainer.save() every save_every steps

The rollout actor starts its engine from the trainer's current policy directory (the starting
model, or the checkpoint a resumed run continues from). ``ray.init()`` starts a local Ray instance
unless ``address`` names a cluster (``ray start --head`` on the first node, ``ray start
--address=HEAD:6379`` on the others; then ``monet vlpo --ray-address HEAD:6379``).

Resources: the rollout actor asks for ``engine_kwargs.tensor_parallel_size`` GPUs and the trainer
for one when ``device`` is a CUDA device (the trainer then uses ``cuda``: Ray sets its visible
devices); on CPU both ask for ``cpus_per_actor`` (fractional by default, so two actors fit a
2-core machine).
"""

from __future__ import annotations

from typing import Any, Callable

from monet.rl.run_config import VLPORunConfig


def _actors(ray: Any):
    @ray.remote
    class RolloutActor:
        """Holds the rollout engine (``LatentLLM``, or ``monet.generate`` on its own model copy)."""

        def __init__(self, cfg_dict: dict, model_dir: str):
            import monet
            from monet.rl.rollout import HFRolloutEngine
            from monet.rl.trainer import build_engine

            self.cfg = VLPORunConfig.from_dict(cfg_dict)
            if self.cfg.engine == "hf":
                model, processor = monet.load_model(model_dir, dtype=self.cfg.dtype, device=self.cfg.device)
                self.engine = HFRolloutEngine(model, processor)
                self.processor = processor
            else:
                self.engine = build_engine(self.cfg, model_dir, None, None)
                self.processor = self.engine.processor

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
            from monet.rl.weight_sync import probe_generations

            return probe_generations(self.engine.generate, requests, **kw)

        def shutdown(self) -> None:
            if hasattr(self.engine, "shutdown"):
                self.engine.shutdown()

    @ray.remote
    class TrainerActor:
        """Holds a :class:`~monet.rl.trainer.VLPOTrainer` without an engine."""

        def __init__(self, cfg_dict: dict, resume: bool):
            from monet.rl.trainer import VLPOTrainer

            self.t = VLPOTrainer(VLPORunConfig.from_dict(cfg_dict), resume=resume, with_engine=False)

        def policy_dir(self) -> str:
            return self.t.policy_dir

        def state(self) -> tuple[int, int]:
            return self.t.step_count, self.t.cfg.steps

        def begin_step(self) -> bool:
            self.t.begin_step()
            return self.t.sampler.ready()

        def next_round(self):
            prompts = self.t.next_prompts()
            return prompts, self.t.sampling(), self.t.round_index

        def ingest(self, rnd) -> bool:
            return self.t.ingest(rnd)

        def finish_step(self, rounds: int) -> dict:
            return self.t.finish_step(rounds)

        def weights(self):
            return self.t.weights()

        def probe_due(self) -> bool:
            return bool(self.t.cfg.probe_every) and self.t.step_count % self.t.cfg.probe_every == 0

        def probe_requests(self):
            return self.t.probe_requests(), self.t.probe_kwargs()

        def probe(self, requests, kw: dict):
            from monet.rl.weight_sync import hf_generate, probe_generations

            return probe_generations(hf_generate(self.t.policy, self.t.processor), requests, **kw)

        def log_step(self, row: dict, extra: dict) -> dict:
            row = self.t.log_step(row, extra)
            if self.t.save_due() or self.t.step_count >= self.t.cfg.steps:
                self.t.save()
            return row

        def close(self) -> None:
            self.t.close()

    return RolloutActor, TrainerActor


def run_vlpo_ray(cfg: VLPORunConfig, *, resume: bool = False, address: str | None = None,
                 cpus_per_actor: float = 0.5, printer: Callable[[str], None] = print) -> list[dict]:
    """Run VLPO until ``cfg.steps`` with the two actors (module docstring); returns the step rows."""
    try:
        import ray
    except ImportError:
        raise ImportError("the Ray controller needs ray (pip install 'ray[default]>=2.60,<2.61', or the "
                          "package's [rl] extra); without it use --controller local") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
    RolloutActor, TrainerActor = _actors(ray)
    cuda = cfg.device.startswith("cuda")
    d = cfg.to_dict()
    if cuda:
        d["device"] = "cuda"  # Ray makes the actor's GPU visible as device 0
    tp = int(cfg.engine_kwargs.get("tensor_parallel_size", 1))
    trainer = TrainerActor.options(num_cpus=cpus_per_actor, num_gpus=1 if cuda else 0).remote(d, resume)
    policy_dir = ray.get(trainer.policy_dir.remote())
    # the latent runner needs vLLM's V1 model runner on GPU (LatentLLM refuses V2 with a clear error)
    env = {"env_vars": {"VLLM_USE_V2_MODEL_RUNNER": "0"}} if cuda and cfg.engine == "vllm" else None
    rollout = RolloutActor.options(num_cpus=cpus_per_actor, num_gpus=tp if cuda else 0,
                                   runtime_env=env).remote(d, policy_dir)
    rows = []
    try:
        step, total = ray.get(trainer.state.remote())
        while step < total:
            ready = ray.get(trainer.begin_step.remote())
            rounds = 0
            while not ready and rounds < cfg.max_rounds_per_step:
                prompts, sampling, round_index = ray.get(trainer.next_round.remote())
                rnd = rollout.generate.remote(prompts, sampling, round_index)
                ready = ray.get(trainer.ingest.remote(rnd))  # the round goes actor to actor via the store
                rounds += 1
            row = ray.get(trainer.finish_step.remote(rounds))
            extra = {}
            if row["trained"]:
                extra = ray.get(rollout.load_weights.remote(trainer.weights.remote()))
                if ray.get(trainer.probe_due.remote()):
                    from monet.rl.weight_sync import compare_generations

                    reqs, kw = ray.get(trainer.probe_requests.remote())
                    probe = compare_generations(ray.get(rollout.probe.remote(reqs, kw)),
                                                ray.get(trainer.probe.remote(reqs, kw)))
                    extra["sync/probe_tokens_match"] = float(probe.tokens_match)
                    extra["sync/probe_latent_diff"] = probe.max_latent_diff
            rows.append(ray.get(trainer.log_step.remote(row, extra)))
            step = row["step"]
    finally:
        try:
            ray.get([rollout.shutdown.remote(), trainer.close.remote()])
        finally:
            ray.kill(rollout)
            ray.kill(trainer)
            if started:
                ray.shutdown()
    return rows
