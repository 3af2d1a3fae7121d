"""GRPOTrainer: the state of a GRPO run (policy, engine, optimizer, reference) and its step: sample G completions
of each prompt through the engine, score them, take μ passes of clipped-surrogate updates over them. The
algorithm and where it departs from the papers: grpo.py's docstring; `train_grpo` (grpo.py) drives it."""

from __future__ import annotations

import contextlib
import copy
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nanoseek.engine.engine import Engine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.model.moe import update_bias
from nanoseek.rl.config import GRPOConfig, GRPOError
from nanoseek.rl.distributed import (
    StepShard,
    check_world,
    gather_rows,
    max_over_ranks,
    policy_forward,
    share,
    sum_over_ranks,
    uncounted,
)
from nanoseek.rl.loss import group_advantages, grpo_loss, sequence_logprobs
from nanoseek.rl.rollout import STATS, Rollout, RolloutBatch, hash_seed, rollout_metrics, rollout_stats
from nanoseek.tasks.rewards import RewardFn, RewardWeights, task_reward_fn
from nanoseek.tasks.template import prompt_text
from nanoseek.train import parallel
from nanoseek.train.optim import adamw


@dataclass
class StepRollouts:
    """One step's rollouts as this rank sees them (under torchrun each rank samples a share of the prompts)."""

    sampled: list[Rollout]  # this rank's rollouts
    kept: list[Rollout]  # those of them in the groups kept for the update, in the kept order
    stats: torch.Tensor  # rollout_stats of every rank's rollouts, in group order
    kept_groups: list[int]  # the kept groups (all ranks'), in order
    times: dict[str, float]


# What a step's update adds up over its micro-batches (and, under torchrun, over the ranks).
SUMS = (
    "loss",
    "tokens",
    "kl",
    "clip_low",
    "clip_high",
    "ratios",
    "entropy",
    "ent_tokens",
    "grad_norm",
    "gap",
    "gap_tokens",
    "expert_load",
    "expert_load_max",
)


class GRPOTrainer:
    """The state of a GRPO run: policy, engine, optimizer, reference. `train_grpo` drives it."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        task,
        cfg: GRPOConfig,
        *,
        reward_fn: RewardFn | None = None,
        prompt_fn: Callable[[Any], str] | None = None,
        engine: Engine | None = None,
    ):
        self.model, self.tokenizer, self.task, self.cfg = model, tokenizer, task, cfg
        self.rank, self.world = parallel.rank(), parallel.world_size()
        check_world(cfg, self.world, model.config)
        self.sharded = cfg.fsdp or cfg.expert_parallel
        if self.sharded and engine is not None:
            raise GRPOError("a sharded update (fsdp / expert_parallel) builds its own engine over a full copy")
        # DeepSeek-V3.2 (DSA): the policy trains on the sparse attention the engine samples with; the indexer
        # is left as pretraining made it (no KL here, and its top-k selection passes no gradient).
        model.set_dsa_stage(dense_attention=False, indexer_kl=False)
        self.reward_fn = reward_fn or task_reward_fn(task, RewardWeights(**cfg.reward_weights))
        self.prompt_fn = prompt_fn or prompt_text
        # The full weights the engine samples from (and π_old is computed with): the policy itself, or under
        # a sharded update a copy that `refresh_rollout_model` gathers the shards into after every step.
        self.rollout_model = self._frozen_copy(model) if self.sharded else model
        self.engine = engine or Engine(
            self.rollout_model,
            tokenizer,
            max_batch_size=min(cfg.batch_size, 256),
            cache_tokens=max(1 << 16, cfg.batch_size * (cfg.max_completion_length + 256)),
        )
        # β = 0: no reference model at all (no memory, no forward).
        self.ref_model = self._frozen_copy(model) if cfg.beta > 0 else None
        self.ref_step = 0  # the step whose policy the reference is
        self.policy = policy_forward(model, cfg)  # the training forward; shards `model` if asked
        self.optimizer = adamw(model, cfg.learning_rate, weight_decay=cfg.weight_decay, betas=(0.9, 0.99), eps=1e-8)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        )
        self.step = 0

    @staticmethod
    def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
        ref = copy.deepcopy(model).eval()
        ref.requires_grad_(False)
        return ref

    def sync_reference(self) -> None:
        """R1-Zero: the reference becomes the current policy (every ref_model_sync_steps steps)."""
        if self.ref_model is not None:
            self.ref_model.load_state_dict(self.rollout_model.state_dict())
            self.ref_step = self.step

    def refresh_rollout_model(self) -> None:
        """After the policy changed: the engine's weights become the policy's (gathered from the shards if the
        update is sharded; collective) and prompt latents cached with the old weights are dropped."""
        if self.rollout_model is not self.model:
            self.rollout_model.load_state_dict(parallel.gather_full(self.model, self.model.state_dict()))
        self.engine.reset_prefix_cache()

    # ---- 1. rollouts -----------------------------------------------------------------------------
    def generate(self, problems: list[Any], seeds: list[int], first_group: int = 0) -> list[Rollout]:
        """G completions of each problem through the engine (problems[j] sampled with seeds[j]), all prompts
        in one engine batch; the rollouts of problems[j] get group index first_group + j."""
        cfg = self.cfg
        if not problems:  # a rank whose share of a refill round is empty
            return []
        prompts = [self.tokenizer.encode(self.prompt_fn(p)) for p in problems]
        params = [
            SamplingParams(
                n=cfg.num_generations,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                max_tokens=cfg.max_completion_length,
                ignore_eos=cfg.ignore_eos,
                logprobs=True,
                seed=seed,
            )
            for seed in seeds
        ]
        self.rollout_model.eval()
        outs = self.engine.generate(prompts, params)
        rollouts = []
        for g, (problem, ids, out) in enumerate(zip(problems, prompts, outs)):
            if out.error:
                raise GRPOError(f"the engine refused a prompt of {len(ids)} tokens: {out.error}")
            for c in sorted(out.outputs, key=lambda c: c.index):
                rollouts.append(
                    Rollout(
                        problem,
                        first_group + g,
                        ids,
                        list(c.token_ids),
                        c.text or "",
                        c.finish_reason or "length",
                        c.logprobs,
                    )
                )
        return rollouts

    # ---- 2. rewards ------------------------------------------------------------------------------
    def score(self, rollouts: list[Rollout]) -> None:
        scores = self.reward_fn([r.problem for r in rollouts], [r.text for r in rollouts])
        for r, s in zip(rollouts, scores, strict=True):
            r.reward, r.accuracy, r.format = float(s.total), float(s.accuracy), float(s.format)

    def collect(self, step: int) -> StepRollouts:
        """Rollouts and rewards for one step. Every rank draws the same prompts and seeds and samples its share;
        the statistics of all ranks' rollouts decide, identically everywhere, which groups are kept and their
        advantages, so W processes keep what one process would."""
        cfg, G = self.cfg, self.cfg.num_generations
        rng = random.Random(f"grpo-{cfg.seed}-{step}")  # per step, so a resumed run draws the same
        sampled: list[Rollout] = []
        stats: list[torch.Tensor] = []
        kept_groups: list[int] = []
        t_gen = t_rew = 0.0
        rounds = 1 + (cfg.max_resample_rounds if cfg.dynamic_sampling else 0)
        for _ in range(rounds):
            want = cfg.prompts_per_step - len(kept_groups)
            if want <= 0:
                break
            problems = [self.task.sample(rng, "train") for _ in range(want)]
            seeds = [rng.getrandbits(62) for _ in problems]
            first, mine = sum(map(len, stats)) // G, share(want, self.rank, self.world)
            t0 = time.perf_counter()
            rollouts = self.generate(problems[mine], seeds[mine], first_group=first + mine.start)
            t1 = time.perf_counter()
            if rollouts:
                self.score(rollouts)
            t_gen, t_rew = t_gen + t1 - t0, t_rew + time.perf_counter() - t1
            sampled += rollouts
            stats.append(gather_rows(rollout_stats(rollouts, cfg.mask_truncated_completions)))
            rewards = stats[-1][:, STATS.index("reward")].view(want, G)
            informative = ~(rewards == rewards[:, :1]).all(dim=1)
            kept_groups += [first + g for g in range(want) if informative[g] or not cfg.dynamic_sampling]
        kept_groups = kept_groups[: cfg.prompts_per_step]
        all_stats = torch.cat(stats)
        kept = []
        if kept_groups:
            rewards = all_stats[:, STATS.index("reward")].view(-1, G)[kept_groups]  # (K, G), every rank's
            advantages = group_advantages(rewards, cfg.reward_scaling)
            position = {g: i for i, g in enumerate(kept_groups)}
            for i, r in enumerate(sampled):  # this rank's groups, G rollouts each, contiguous
                if r.group in position:
                    r.advantage = float(advantages[position[r.group], i % G])
                    kept.append(r)
        times = {"time/rollout_s": t_gen, "time/reward_s": t_rew}
        return StepRollouts(sampled, kept, all_stats, kept_groups, times)

    # ---- 3. the policy update -------------------------------------------------------------------
    def _micro_groups(self, batch: RolloutBatch, groups: Sequence[int]) -> list[list[int]]:
        """`groups` split into micro-batches of whole groups, longest completions first, so that each
        micro-batch pads to lengths close to its own (the padding is trimmed per micro-batch)."""
        per = max(1, self.cfg.micro_batch_size // batch.group_size)
        longest = batch.lengths.view(-1, batch.group_size).amax(dim=1).tolist()
        order = sorted(groups, key=lambda g: -longest[g])
        return [order[i : i + per] for i in range(0, len(order), per)]

    @torch.no_grad()
    def _fill_logps(self, model: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor:
        """A no-grad forward of `model` over the whole batch, (N, Tc)."""
        out = torch.zeros(batch.completion_ids.shape, device=batch.completion_ids.device)
        for groups in self._micro_groups(batch, range(batch.n_groups)):
            lp, _ = sequence_logprobs(model, batch.select(groups), self.cfg.temperature)
            out[batch.rows(groups), : lp.shape[1]] = lp
        return out

    def update(self, batch: RolloutBatch, step: int, shard: StepShard | None = None) -> dict[str, float]:
        """μ passes over the step's kept groups, each split into minibatches of whole groups, one optimizer step
        each. `shard`: which of the step's groups `batch` holds (default: all of them, one process)."""
        cfg = self.cfg
        shard = shard or StepShard.whole(batch)
        batch = batch.to(next(self.model.parameters()).device)
        n_updates = cfg.num_iterations * cfg.num_minibatches
        if cfg.beta > 0:
            batch.ref_logps = self._fill_logps(self.ref_model, batch)
        if n_updates > 1:
            if cfg.old_logprobs == "engine":
                if batch.sample_logps is None:
                    raise GRPOError("old_logprobs='engine' but the rollouts carry no engine log-probs")
                batch.old_logps = batch.sample_logps
            else:
                self.rollout_model.eval()
                batch.old_logps = self._fill_logps(self.rollout_model, batch)
        gen = torch.Generator().manual_seed(hash_seed(cfg.seed, step))
        local = {p: g for g, p in enumerate(shard.positions) if p >= 0}  # kept position -> group of `batch`
        sums = dict.fromkeys(SUMS, 0.0)
        self.model.train()
        for it in range(cfg.num_iterations):
            order = (
                torch.randperm(shard.n_groups, generator=gen).tolist()
                if cfg.num_minibatches > 1
                else list(range(shard.n_groups))
            )
            for mb, positions in enumerate(_split(order, cfg.num_minibatches)):
                # the whole minibatch's counts (every rank's groups), so that W ranks sum to one process's loss
                n_seqs, n_tokens = len(positions) * batch.group_size, float(shard.group_tokens[positions].sum())
                groups = [local[p] for p in positions if p in local]
                self.optimizer.zero_grad(set_to_none=True)
                self._accumulate(batch, groups, n_seqs, n_tokens, sums, gap=it == 0 and mb == 0)
                parallel.finish_expert_grads(self.model)
                # the global norm (expert slices and FSDP shards included): the same on every rank
                sums["grad_norm"] += parallel.clip_grad_norm(self.model, cfg.max_grad_norm)
                self.optimizer.step()
                # max/mean routed tokens per expert, each MoE layer that routed any (the MTP module's does not run)
                load = [v for v in self._after_optimizer_step() if v > 0]
                if load:
                    sums["expert_load"] += sum(load) / len(load)
                    sums["expert_load_max"] = max(sums["expert_load_max"], max(load))
        self.model.eval()
        same = ("grad_norm", "expert_load", "expert_load_max")  # equal on every rank already
        sums = {**sum_over_ranks({k: v for k, v in sums.items() if k not in same}), **{k: sums[k] for k in same}}
        tokens, ratios = max(sums["tokens"], 1.0), max(sums["ratios"], 1.0)  # ratios: sequences for gspo
        metrics = {
            "loss": sums["loss"] / n_updates,
            "kl": sums["kl"] / tokens,
            "clip_ratio/low": sums["clip_low"] / ratios,
            "clip_ratio/high": sums["clip_high"] / ratios,
            "clip_ratio/total": (sums["clip_low"] + sums["clip_high"]) / ratios,
            "entropy": sums["entropy"] / max(sums["ent_tokens"], 1.0),
            "grad_norm": sums["grad_norm"] / n_updates,
        }
        if sums["expert_load"]:  # routing's balance in the updates: max/mean tokens per expert (1 = even)
            metrics["expert_load/mean"] = sums["expert_load"] / n_updates
            metrics["expert_load/max"] = sums["expert_load_max"]
        if sums["gap_tokens"]:
            metrics["logprob_gap"] = sums["gap"] / sums["gap_tokens"]
        return metrics

    def _accumulate(
        self, batch: RolloutBatch, groups: list[int], n_seqs: int, n_tokens: float, sums: dict, gap: bool
    ) -> None:
        """Forward and backward of this rank's `groups` of a minibatch, micro-batch by micro-batch, adding the
        loss's statistics to `sums`. DDP all-reduces the gradients after the last micro-batch only. A rank
        holding none of the minibatch's groups still takes part in DDP's all-reduce, with a stand-in
        micro-batch and a zero loss; a sharded update (which communicates in every forward) runs stand-ins
        until it has run as many micro-batches as the busiest rank."""
        cfg = self.cfg
        micros = self._micro_groups(batch, groups)
        n_micros = max_over_ranks(len(micros)) if self.sharded else max(len(micros), 1)
        for i in range(n_micros):
            stand_in = i >= len(micros)
            micro = batch.select([0] if stand_in else micros[i])
            sync = i == n_micros - 1
            no_sync = contextlib.nullcontext() if sync else parallel.no_gradient_sync(self.policy)
            with no_sync, uncounted(self.model) if stand_in else contextlib.nullcontext():
                logps, entropy = self.policy(micro, cfg.temperature, with_entropy=True)
                old = micro.old_logps if micro.old_logps is not None else logps.detach()
                out = grpo_loss(
                    logps,
                    old,
                    micro.advantages,
                    micro.mask,
                    loss_type=cfg.loss_type,
                    epsilon=cfg.epsilon,
                    epsilon_high=cfg.clip_high,
                    beta=cfg.beta,
                    ref_logps=micro.ref_logps,
                    max_completion_length=cfg.max_completion_length,
                    num_sequences=n_seqs,
                    num_tokens=n_tokens,
                )
                # DDP / FSDP2 average the W ranks' gradients; the loss is already divided by the global counts
                (out.loss * (0.0 if stand_in else self.world)).backward()
            if stand_in:
                continue
            real = micro.token_mask
            sums["loss"] += float(out.loss.detach())
            sums["tokens"] += out.n_tokens
            sums["kl"] += out.kl_sum
            sums["clip_low"] += out.clip_low
            sums["clip_high"] += out.clip_high
            sums["ratios"] += out.n_ratios
            sums["entropy"] += float(entropy[real].sum())
            sums["ent_tokens"] += float(real.sum())
            if gap and micro.sample_logps is not None and cfg.temperature == 1.0:
                # rollout/training mismatch: the engine's log-probs vs this forward, same weights
                sums["gap"] += float((logps.detach() - micro.sample_logps).abs()[real].sum())
                sums["gap_tokens"] += float(real.sum())

    def _after_optimizer_step(self) -> list[float]:
        """Count routed tokens into the router bias (if γ > 0) and make the engine decode with the new weights.
        Returns each MoE layer's load imbalance (max/mean tokens per expert) over the update's forwards."""
        load = update_bias(self.model, self.cfg.router_bias_update_speed)
        self.refresh_rollout_model()
        return load

    def _local_batch(self, rollouts: StepRollouts) -> tuple[RolloutBatch, StepShard]:
        """This rank's kept groups packed, and where they sit among the step's. A rank left with none (dynamic
        sampling dropped them all) packs its first sampled group as a stand-in that is never trained on."""
        cfg, G = self.cfg, self.cfg.num_generations
        kept = rollouts.kept or rollouts.sampled[:G]
        batch = RolloutBatch.from_rollouts(
            kept, G, cfg.mask_truncated_completions, pad_id=self.tokenizer.pad_id if self.tokenizer is not None else 0
        )
        position = {g: i for i, g in enumerate(rollouts.kept_groups)}
        positions = [position[r.group] if rollouts.kept else -1 for r in kept[::G]]
        tokens = rollouts.stats[:, STATS.index("loss_tokens")].view(-1, G).sum(-1)[rollouts.kept_groups]
        return batch, StepShard(positions, tokens)

    # ---- one step ----------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        step = self.step + 1
        t0 = time.perf_counter()
        rollouts = self.collect(step)
        t1 = time.perf_counter()
        metrics: dict[str, float] = {"step": step, "lr": self.optimizer.param_groups[0]["lr"]}
        if rollouts.kept_groups:  # on every rank or none: the kept groups are the same everywhere
            batch, shard = self._local_batch(rollouts)
            metrics.update(self.update(batch, step, shard))
        self.scheduler.step()
        self.step = step
        if cfg.beta > 0 and cfg.ref_model_sync_steps and step % cfg.ref_model_sync_steps == 0:
            self.sync_reference()
        t2 = time.perf_counter()
        metrics.update(rollout_metrics(rollouts.stats, len(rollouts.kept_groups), cfg.num_generations))
        gen_tokens = sum(len(r.completion_ids) for r in rollouts.sampled)  # this rank's: its own throughput
        times = rollouts.times
        metrics.update(times)
        metrics.update(
            {
                "skipped": float(not rollouts.kept_groups),
                "time/update_s": t2 - t1,
                "time/step_s": t2 - t0,
                "throughput/tokens_per_s": gen_tokens / (t2 - t0),
                "throughput/gen_tokens_per_s": gen_tokens / max(times["time/rollout_s"], 1e-9),
            }
        )
        return metrics


def _split(items: list[int], n: int) -> list[list[int]]:
    """n nearly equal consecutive chunks (none empty when len(items) >= n)."""
    k, r = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + k + (i < r)
        if end > start:
            out.append(items[start:end])
        start = end
    return out
