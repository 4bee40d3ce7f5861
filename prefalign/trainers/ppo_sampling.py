"""The sampling half of a rollout (a mixin of `prefalign.trainers.ppo.PPOTrainer`, so of the critic-free trainer
and the held-out evaluation too): keyed sampling through `prefalign.rollout.generate`, the decoded and scored
completions, and the no-gradient forwards after sampling (policy, reference, value), where at fp32 the decode
loop's recorded log-probs stand in for the policy's forward (`RolloutSampling.old_logprobs_from_decode`)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from prefalign.losses import apply_missing_eos_penalty
from prefalign.models.frozen import frozen_autocast
from prefalign.models.logprobs import completion_logprobs
from prefalign.models.value import token_values
from prefalign.rollout import cut_at_stop, generate
from prefalign.trainers.lora import adapter_off

if TYPE_CHECKING:
    from accelerate import Accelerator

    from prefalign.rollout import SamplingConfig
    from prefalign.trainers.ppo_config import PPOConfig


class RolloutSampling:
    """Sampling, scoring and the rollout's no-gradient forwards, through the trainer's models."""

    if TYPE_CHECKING:  # what it reads of the trainer (`Run`, `PPOTrainer.setup` / `build` / `build_sampling`)
        accelerator: Accelerator
        backend: Any
        precision: str
        policy: Any
        sampler: Any
        ref_model: Any
        trained_policy: Any
        trained_value: Any
        tokenizer: Any
        prompts: list[str]
        prompt_columns: Any
        reward_source: Any
        frozen_dtype: torch.dtype
        eos_ids: list[int]
        sampling: SamplingConfig

        @property
        def cfg(self) -> PPOConfig: ...

    def score_completions(self, prompt_rows: list[int], gen, timing: dict, where: str):
        """``(prompts, texts, scores)`` of a rollout's completions ``gen`` of ``prompt_rows``: the decoded text cut at
        the stop strings, scored by the reward source with the rows' other columns (``where`` names it in a bad
        score's error), clipped to --score-clip, with --missing-eos-penalty on rows that never ended. Records
        ``time/scoring``."""
        from prefalign.data import take_rows
        from prefalign.rewards import check_scores, score_with_columns

        cfg, dev = self.cfg, self.accelerator.device
        t0 = time.perf_counter()
        prompts = [self.prompts[i] for i in prompt_rows]
        texts = self.decode_completions(gen)
        # a row's other columns once per completion, as its prompt
        scores = score_with_columns(self.reward_source, prompts, texts, take_rows(self.prompt_columns, prompt_rows))
        scores = check_scores(scores, len(texts), where).to(dev)
        timing["time/scoring"] = time.perf_counter() - t0
        if cfg.score_clip is not None:
            scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
        return prompts, texts, apply_missing_eos_penalty(scores, gen.ended.to(dev), cfg.missing_eos_penalty)

    def decode_completions(self, gen) -> list[str]:
        """The text of each completion of ``gen``, cut before the first --stop string: what a reward scores."""
        decoded = self.tokenizer.batch_decode(gen.response_ids, skip_special_tokens=True)
        return [cut_at_stop(t, self.cfg.stop) for t in decoded]

    def sample(self, prompt_ids: list[list[int]], row_keys: list[int], timing: dict, entropy: bool = True):
        """``(gen, query_response, attention_mask, completion_mask)``: one completion per prompt of ``prompt_ids``
        (token id lists), row r drawn from the stream keyed ``row_keys[r]``; the masks are ``(B, P+R)``, the
        response of every row starting at column P. Where `old_logprobs_from_decode`, ``gen`` carries the decode
        loop's log-probs, and its entropies unless ``entropy`` is off. Records ``time/generation``. A collective
        under FSDP."""
        from prefalign.data import PromptCollator

        acc, tok, dev = self.accelerator, self.tokenizer, self.accelerator.device
        t0 = time.perf_counter()
        batch = PromptCollator(tok.pad_token_id)(prompt_ids)
        with acc.autocast():
            gen = self.trained_policy.frozen_forward(
                generate,
                batch["input_ids"].to(dev),
                batch["attention_mask"].to(dev),
                self.sampling,
                model=self.sampler,
                eos_ids=self.eos_ids,
                pad_id=tok.pad_token_id,
                tokenizer=tok,
                seed=self.cfg.seed,
                synced=self.backend.sharded,
                row_keys=row_keys,
                record_logprobs=self.old_logprobs_from_decode,
                record_entropy=entropy,
            )
        timing["time/generation"] = time.perf_counter() - t0
        return (gen, *gen.sequences())

    def response_forwards(
        self,
        seqs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        width: int,
        recorded: tuple[torch.Tensor, torch.Tensor | None] | None = None,
        *,
        policy: bool = True,
        entropy: bool = True,
        reference: bool = True,
        value: bool = False,
    ) -> tuple[Any, Any, Any, Any]:  # (B, R) tensors; which are None, the switches say
        """``(logps, entropy, ref_logps, values)``, each ``(B, R)`` float32 over the response columns (from the
        prompt width ``width`` on) of a rollout's ``seqs`` = ``(query_response, attention_mask, completion_mask)``
        (`prefalign.rollout.Generation.sequences`, each ``(B, P+R)``): the no-gradient forwards after sampling, at
        the sampling temperature, shared by PPO, the critic-free family and the held-out evaluation.

        The policy's log-probs and entropy are ``recorded`` (`Generation.recorded`: the decode loop's, where
        `old_logprobs_from_decode`) when given and holding what is asked (a recording without entropy does not
        serve ``entropy``), else a forward's; ``entropy=False`` leaves the entropy out. None where ``policy`` /
        ``entropy`` / ``reference`` / ``value`` is off (``value``: the value model's)."""
        temperature, dev = self.cfg.temperature, self.accelerator.device
        if recorded is not None and entropy and recorded[1] is None:
            recorded = None
        logps = ent = ref_logps = values = None
        with self.accelerator.autocast():
            if policy and recorded is None:
                out = self.trained_policy.frozen_forward(
                    completion_logprobs, *seqs, temperature=temperature, return_entropy=entropy
                )
                logps, ent = out if entropy else (out, None)
            if reference and self.ref_model is not None:  # a whole frozen copy on every process
                with frozen_autocast(dev, self.frozen_dtype):
                    ref_logps = completion_logprobs(self.ref_model, *seqs, temperature=temperature)
            elif reference:
                with adapter_off(self.policy):
                    ref_logps = self.trained_policy.frozen_forward(completion_logprobs, *seqs, temperature=temperature)
            if value:
                values = self.trained_value.frozen_forward(token_values, *seqs)
        ref_logps, values = response_columns(ref_logps, width), response_columns(values, width)
        if policy and recorded is not None:
            return recorded[0], recorded[1] if entropy else None, ref_logps, values
        return response_columns(logps, width), response_columns(ent, width), ref_logps, values

    @property
    def old_logprobs_from_decode(self) -> bool:
        """Whether rollouts take the policy's old log-probs and entropy from the decode loop's recording
        (`prefalign.rollout.decode.LogprobRecorder`) instead of a forward after sampling: when the policy itself
        samples (float32 precision). A bf16 sampling copy's would differ from the policy's own forward by bf16
        rounding, which the update's ratio would read as a policy change, so there the forward stays; so it does
        where the sample falls back to ``model.generate`` (`prefalign.rollout.decode.loop_fallback`)."""
        return self.sampler is self.policy and self.precision == "fp32"


def response_columns(x: torch.Tensor | None, width: int) -> torch.Tensor | None:
    """The response columns (from ``width`` on) of a ``(B, P+R)`` forward's output, float32; None stays None."""
    return None if x is None else x[:, width:].float()
