"""GRPOTrainer: the state of a GRPO run (policy, engine, optimizer, reference) and its step: sample G completions
of each prompt through the engine, score them, take μ passes of clipped-surrogate updates over them. The
algorithm and where it departs from the papers: grpo.py's docstring; `train_grpo` (grpo.py) drives it."""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from nanoseek.engine.engine import Engine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.model.moe import update_bias
from nanoseek.rl.config import GRPOConfig, GRPOError
from nanoseek.rl.loss import group_advantages, grpo_loss, sequence_logprobs
from nanoseek.rl.rollout import Rollout, RolloutBatch, hash_seed, rollout_metrics
from nanoseek.tasks.rewards import RewardFn, RewardWeights, task_reward_fn
from nanoseek.tasks.template import prompt_text
from nanoseek.train.optim import adamw


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
        # DeepSeek-V3.2 (DSA): the policy trains on the sparse attention the engine samples with; the indexer
        # is left as pretraining made it (no KL here, and its top-k selection passes no gradient).
        model.set_dsa_stage(dense_attention=False, indexer_kl=False)
        self.reward_fn = reward_fn or task_reward_fn(task, RewardWeights(**cfg.reward_weights))
        self.prompt_fn = prompt_fn or prompt_text
        self.engine = engine or Engine(
            model,
            tokenizer,
            max_batch_size=min(cfg.batch_size, 256),
            cache_tokens=max(1 << 16, cfg.batch_size * (cfg.max_completion_length + 256)),
        )
        # β = 0: no reference model at all (no memory, no forward).
        self.ref_model = self._frozen_copy(model) if cfg.beta > 0 else None
        self.ref_step = 0  # the step whose policy the reference is
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
            self.ref_model.load_state_dict(self.model.state_dict())
            self.ref_step = self.step

    # ---- 1. rollouts -----------------------------------------------------------------------------
    def generate(self, problems: list[Any], rng: random.Random, first_group: int = 0) -> list[Rollout]:
        """G completions of each problem through the engine, all prompts in one engine batch; the rollouts
        of problems[j] get group index first_group + j."""
        cfg = self.cfg
        prompts = [self.tokenizer.encode(self.prompt_fn(p)) for p in problems]
        params = [
            SamplingParams(
                n=cfg.num_generations,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                max_tokens=cfg.max_completion_length,
                ignore_eos=cfg.ignore_eos,
                logprobs=True,
                seed=rng.getrandbits(62),
            )
            for _ in problems
        ]
        self.model.eval()
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

    def collect(self, step: int) -> tuple[list[Rollout], list[Rollout], dict[str, float]]:
        """Rollouts and rewards for one step: (all sampled, the groups kept for the update, timings)."""
        cfg, G = self.cfg, self.cfg.num_generations
        rng = random.Random(f"grpo-{cfg.seed}-{step}")  # per step, so a resumed run draws the same
        sampled: list[Rollout] = []
        kept: list[list[Rollout]] = []
        t_gen = t_rew = 0.0
        rounds = 1 + (cfg.max_resample_rounds if cfg.dynamic_sampling else 0)
        for _ in range(rounds):
            want = cfg.prompts_per_step - len(kept)
            if want <= 0:
                break
            problems = [self.task.sample(rng, "train") for _ in range(want)]
            t0 = time.perf_counter()
            rollouts = self.generate(problems, rng, first_group=len(sampled) // G)
            t1 = time.perf_counter()
            self.score(rollouts)
            t_gen, t_rew = t_gen + t1 - t0, t_rew + time.perf_counter() - t1
            sampled += rollouts
            groups = [rollouts[i : i + G] for i in range(0, len(rollouts), G)]
            if cfg.dynamic_sampling:
                groups = [g for g in groups if len({r.reward for r in g}) > 1]
            kept += groups
        kept = kept[: cfg.prompts_per_step]
        flat = [r for g in kept for r in g]
        if flat:
            rewards = torch.tensor([r.reward for r in flat]).view(len(kept), G)
            for r, a in zip(flat, group_advantages(rewards, cfg.reward_scaling).flatten().tolist()):
                r.advantage = a
        return sampled, flat, {"time/rollout_s": t_gen, "time/reward_s": t_rew}

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

    def update(self, batch: RolloutBatch, step: int) -> dict[str, float]:
        """μ passes over the batch, each split into minibatches of whole groups, one optimizer step each."""
        cfg = self.cfg
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
                self.model.eval()
                batch.old_logps = self._fill_logps(self.model, batch)
        gen = torch.Generator().manual_seed(hash_seed(cfg.seed, step))
        sums = dict(
            loss=0.0,
            tokens=0.0,
            kl=0.0,
            clip_low=0.0,
            clip_high=0.0,
            entropy=0.0,
            ent_tokens=0.0,
            grad_norm=0.0,
            gap=0.0,
            gap_tokens=0.0,
        )
        self.model.train()
        for it in range(cfg.num_iterations):
            order = (
                torch.randperm(batch.n_groups, generator=gen).tolist()
                if cfg.num_minibatches > 1
                else list(range(batch.n_groups))
            )
            for mb, groups in enumerate(_split(order, cfg.num_minibatches)):
                rows = batch.rows(groups)
                n_seqs, n_tokens = len(rows), float(batch.mask[rows].sum())
                self.optimizer.zero_grad(set_to_none=True)
                for micro in map(batch.select, self._micro_groups(batch, groups)):
                    logps, entropy = sequence_logprobs(self.model, micro, cfg.temperature, with_entropy=True)
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
                    out.loss.backward()
                    real = micro.token_mask
                    sums["loss"] += float(out.loss.detach())
                    sums["tokens"] += out.n_tokens
                    sums["kl"] += out.kl_sum
                    sums["clip_low"] += out.clip_low
                    sums["clip_high"] += out.clip_high
                    sums["entropy"] += float(entropy[real].sum())
                    sums["ent_tokens"] += float(real.sum())
                    if it == 0 and mb == 0 and micro.sample_logps is not None and cfg.temperature == 1.0:
                        # rollout/training mismatch: the engine's log-probs vs this forward, same weights
                        sums["gap"] += float((logps.detach() - micro.sample_logps).abs()[real].sum())
                        sums["gap_tokens"] += float(real.sum())
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                sums["grad_norm"] += float(grad_norm)
                self.optimizer.step()
                self._after_optimizer_step()
        self.model.eval()
        tokens = max(sums["tokens"], 1.0)
        metrics = {
            "loss": sums["loss"] / n_updates,
            "kl": sums["kl"] / tokens,
            "clip_ratio/low": sums["clip_low"] / tokens,
            "clip_ratio/high": sums["clip_high"] / tokens,
            "clip_ratio/total": (sums["clip_low"] + sums["clip_high"]) / tokens,
            "entropy": sums["entropy"] / max(sums["ent_tokens"], 1.0),
            "grad_norm": sums["grad_norm"] / n_updates,
        }
        if sums["gap_tokens"]:
            metrics["logprob_gap"] = sums["gap"] / sums["gap_tokens"]
        return metrics

    def _after_optimizer_step(self) -> None:
        """Count routed tokens into the router bias (if γ > 0) and make the engine decode with the new weights."""
        update_bias(self.model, self.cfg.router_bias_update_speed)
        self.engine.reset_prefix_cache()  # prompt latents cached with the old weights are stale

    # ---- one step ----------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        step = self.step + 1
        t0 = time.perf_counter()
        sampled, kept, times = self.collect(step)
        t1 = time.perf_counter()
        metrics: dict[str, float] = {"step": step, "lr": self.optimizer.param_groups[0]["lr"]}
        if kept:
            batch = RolloutBatch.from_rollouts(
                kept,
                cfg.num_generations,
                cfg.mask_truncated_completions,
                pad_id=self.tokenizer.pad_id if self.tokenizer is not None else 0,
            )
            metrics.update(self.update(batch, step))
        self.scheduler.step()
        self.step = step
        if cfg.beta > 0 and cfg.ref_model_sync_steps and step % cfg.ref_model_sync_steps == 0:
            self.sync_reference()
        t2 = time.perf_counter()
        metrics.update(rollout_metrics(sampled, kept, cfg))
        gen_tokens = sum(len(r.completion_ids) for r in sampled)
        metrics.update(times)
        metrics.update(
            {
                "skipped": float(not kept),
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
