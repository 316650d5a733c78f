"""VLPO: latent-aware GRPO for Monet's latent reasoning (the algorithmic core).

A Monet policy emits text tokens and, inside latent spans, continuous latents: at a latent position
the model's input is the final-norm hidden state of the previous position (see
:class:`monet.layout.SpanLayout`). VLPO treats both as actions of one stochastic policy:

* a text token ``t_p`` ~ ``softmax(lm_head(h[p-1]) / T)`` (``T`` the rollout temperature);
* a latent ``z_p`` ~ ``N(mu_p, sigma^2 I)`` with ``mu_p = h[p-1]`` (the state that produced it).
  Rollouts feed ``z = mu + s * eps`` (exploration noise ``s``, default 0: ``z == mu``).

Decoder-forced tokens (``PAD``/``END`` inside spans, a START forced because the prompt ended with
START) are not actions. Which positions carry which terms: :mod:`monet.rl.actions`.

One training step, for prompts with ``n`` rollouts each (a group):

1. **Rewards** ``r = 0.9 * accuracy + 0.1 * format (+ optional length penalty)``
   (:mod:`monet.rl.rewards`).
2. **Online difficulty sampling**: only groups with accuracy in ``(0, 0.6]`` are kept and
   accumulated until a batch of groups is full (:mod:`monet.rl.sampler`).
3. **GRPO advantages** ``A_i = (r_i - mean_group) / (std_group + eps)`` (sample std by default), the
   same at every action of rollout ``i``, text and latent; no critic (:mod:`monet.rl.advantages`).
4. **Log-probabilities** of every action under the current policy, the rollout policy (``old``,
   computed once, no grad) and a frozen reference, each from ONE teacher-forced forward over
   prompt + response with the recorded latents inserted at the latent positions
   (:mod:`monet.rl.logprob`): text ``log_softmax(logits / T)[t_p]``, latent
   ``-||z_p - mu_p||^2 / (2 sigma^2)`` in fp32.
5. **Loss** (:mod:`monet.rl.objective`): PPO surrogate with asymmetric clip ``[1 - 0.2, 1 + 0.3]``
   and dual clip 3.0 for negative advantages, plus ``0.01 * k3`` KL to the reference; text and
   latent terms each token-averaged over the whole mini-batch (global counts) and summed with
   ``latent_weight``.

Settings: :class:`VLPOConfig`; ``docs/vlpo.md`` has a worked example of the position bookkeeping.

The system on top of these pure functions (imported from their modules, not here, so that this
package stays light): RL data (:mod:`monet.rl.data`), rollouts with recorded latents
(:mod:`monet.rl.rollout`), reward grading (:func:`monet.rl.rewards.grade_rollouts`), the
single-process trainer (:mod:`monet.rl.trainer`, ``monet vlpo``), the actor update shared by it and
the data-parallel / DeepSpeed actor group (:mod:`monet.rl.actor`, ``torchrun -m monet.rl.actor``), in-memory weight sync
(:mod:`monet.rl.weight_sync`), the Ray controller (:mod:`monet.rl.controller`), checkpoints
(:mod:`monet.rl.checkpoint`) and the run settings (:mod:`monet.rl.run_config`).
"""

from monet.rl.actions import ActionMasks, action_masks
from monet.rl.advantages import broadcast_advantages, grpo_advantages, grpo_advantages_by_group
from monet.rl.config import LengthPenalty, VLPOConfig
from monet.rl.exploration import explore_latents
from monet.rl.logprob import PolicyLogProbs, RolloutBatch, gaussian_logp, policy_logprobs
from monet.rl.objective import ActionTerms, ObjectiveOutput, clipped_surrogate, k3_kl, merge_metrics, vlpo_loss
from monet.rl.rewards import combine_rewards, length_penalty
from monet.rl.sampler import DifficultySampler, GroupRecord

__all__ = [
    "ActionMasks",
    "ActionTerms",
    "DifficultySampler",
    "GroupRecord",
    "LengthPenalty",
    "ObjectiveOutput",
    "PolicyLogProbs",
    "RolloutBatch",
    "VLPOConfig",
    "action_masks",
    "broadcast_advantages",
    "clipped_surrogate",
    "combine_rewards",
    "explore_latents",
    "gaussian_logp",
    "grpo_advantages",
    "grpo_advantages_by_group",
    "k3_kl",
    "length_penalty",
    "merge_metrics",
    "policy_logprobs",
    "vlpo_loss",
]
