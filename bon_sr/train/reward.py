"""The SR-GRPO reward: stable rank of the FROZEN base model's hidden states, as a TRL reward.

``StableRankReward`` is a plain callable with TRL's custom reward signature. The installed
TRL (1.16) calls every synchronous reward function as::

    reward_func(prompts=prompts, completions=completions, completion_ids=completion_ids_list, **reward_kwargs)

where ``reward_kwargs`` holds the dataset's extra columns, ``trainer_state``, ``log_extra``
and ``log_metric``, and it expects one float (or None) per completion back.

What is scored, per completion:

- the token ids that were sampled: ``completion_ids`` from TRL, and the prompt ids from a
  ``prompt_ids`` column that :class:`~bon_sr.train.trainer.SRGRPOTrainer` adds from its
  generation step. TRL does not pass prompt ids to reward functions by itself, so under a
  plain ``GRPOTrainer`` the reward re-tokenises ``prompts`` the way TRL's
  ``_tokenize_prompts`` does (chat template + generation prompt, or plain tokenisation)
  and logs once that it did so;
- with a single trailing end-of-sequence token dropped (``strip_eos``, default on). TRL
  keeps the EOS it sampled; the Best-of-N sampler cuts a candidate at its EOS. Dropping it
  makes the reward the same number the Best-of-N scorer gives the same sample;
- by the policy with its LoRA adapters DISABLED (``peft``'s ``disable_adapter()``) and in
  eval mode (no dropout), so the reward is a function of the frozen base weights only and
  the policy cannot reshape the geometry it is rewarded on;
- or by ``reward_model``, a separate frozen copy, when the policy has no adapters (full
  fine-tuning); a policy without adapters and no reward model is refused;
- through ``bon_sr.scoring.scorers.HFScorer``, the Best-of-N scorer itself (token set, layer, norm,
  window and the padded-token budget that bounds memory, as in ``HiddenStateConfig``).

An empty scored span gets SR 0.0 (the core convention), below any real completion.

This module knows nothing about configs, presets, datasets or the training loop; it needs
a model (set after the trainer has built the peft model) and, for the fallback above, a
tokenizer. ``repeated_ngram_fraction`` is here because the reward is where completion ids
pass by once per step; it is logged, never rewarded.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Sequence

import torch

from ..errors import ConfigError
from ..scoring.hidden_states import HiddenStateConfig
from ..scoring.scorers import HFScorer

logger = logging.getLogger(__name__)

REPETITION_N = 4


def repeated_ngram_fraction(ids: Sequence[int], n: int = REPETITION_N) -> float:
    """Share of the n-grams of ``ids`` that repeat an earlier n-gram of the same sequence.

    0.0 for text with no repeated n-gram (or fewer than n tokens), close to 1.0 for a loop.
    E.g. ids a b c a b c a b, n=3: 6 trigrams, 3 distinct -> 0.5.
    """
    total = len(ids) - n + 1
    if total <= 0:
        return 0.0
    grams = {tuple(ids[i:i + n]) for i in range(total)}
    return 1.0 - len(grams) / total


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    sources = [getattr(getattr(model, "generation_config", None), "eos_token_id", None),
               getattr(tokenizer, "eos_token_id", None)]
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def has_adapters(model: torch.nn.Module) -> bool:
    """A peft model whose adapters can be switched off (``disable_adapter``)."""
    return callable(getattr(model, "disable_adapter", None))


@contextmanager
def frozen_base(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The base model inside ``model``: LoRA adapters disabled, eval mode, restored after.

    A model without adapters (not a peft model, e.g. a separate frozen reward model) is
    used as it is; ``StableRankReward`` refuses a policy without adapters.
    """
    was_training = model.training
    ctx = model.disable_adapter() if has_adapters(model) else nullcontext()
    model.eval()
    try:
        with ctx:
            yield model
    finally:
        model.train(was_training)


class StableRankReward:
    """TRL reward function: SR of the frozen base model's hidden states per completion.

    >>> reward = StableRankReward(HiddenStateConfig(token_set="response"))   # doctest: +SKIP
    >>> trainer = GRPOTrainer(model, reward_funcs=[reward], peft_config=lora, ...)  # doctest: +SKIP
    >>> reward.bind(trainer)        # after the trainer has wrapped the model with peft

    ``SRGRPOTrainer`` binds itself. ``model`` and ``tokenizer`` may also be set directly.

    The reward must come from FROZEN weights: the policy's base with its LoRA adapters
    disabled, or ``reward_model``, a separate frozen copy (full fine-tuning). A policy
    without adapters and no ``reward_model`` is refused: it would reward the policy with
    the geometry it is itself reshaping.
    """

    __name__ = "stable_rank"

    def __init__(
        self,
        config: HiddenStateConfig | None = None,
        *,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        strip_eos: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
        reward_model: torch.nn.Module | None = None,
    ):
        self.config = config or HiddenStateConfig()
        self.model = model
        self.reward_model = reward_model
        if reward_model is not None:
            reward_model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.strip_eos = strip_eos
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self._warned_retokenise = False

    def bind(self, trainer: Any) -> "StableRankReward":
        """Take the (peft-wrapped) policy and tokenizer from a built GRPOTrainer."""
        self.model = trainer.accelerator.unwrap_model(trainer.model)
        if self.tokenizer is None:
            self.tokenizer = getattr(trainer, "_tokenizer", None) or trainer.processing_class
        self.chat_template_kwargs = dict(getattr(trainer, "chat_template_kwargs", None) or self.chat_template_kwargs)
        return self

    # -- TRL entry point ----------------------------------------------------------------

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]],
        prompt_ids: Sequence[Sequence[int]] | None = None,
        log_metric: Callable[[str, float], None] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        if self.model is None:
            raise ConfigError("StableRankReward has no model: call reward.bind(trainer) after building the "
                              "GRPOTrainer (SRGRPOTrainer does this), or set reward.model.")
        if len(completion_ids) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(completion_ids)} completion_ids")
        if prompt_ids is None:
            prompt_ids = self._tokenise_prompts(prompts)
        responses = [self._response_ids(ids) for ids in completion_ids]
        scores = self.score(prompt_ids, responses)
        if log_metric is not None and scores:
            log_metric("stable_rank/mean", sum(scores) / len(scores))
            log_metric("stable_rank/min", min(scores))
            log_metric("stable_rank/max", max(scores))
            rep = [repeated_ngram_fraction(list(ids)) for ids in completion_ids]
            log_metric(f"completions/repeated_{REPETITION_N}gram_frac", sum(rep) / len(rep))
        return scores

    # -- pieces -------------------------------------------------------------------------

    def score(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]) -> list[float]:
        """SR per (prompt, response) pair under the frozen model, in input order."""
        model = self.reward_model if self.reward_model is not None else self.model
        if model is None:
            raise ConfigError("StableRankReward has no model; set reward.model or call reward.bind(trainer).")
        if self.reward_model is None and not has_adapters(model):
            raise ConfigError("The policy has no LoRA adapters, so its own (trained) weights would compute the "
                              "reward. Train with LoRA (bon-sr train does), or pass a separate frozen copy: "
                              "StableRankReward(..., reward_model=AutoModelForCausalLM.from_pretrained(base)).")
        with frozen_base(model) as base, torch.inference_mode():
            return [s["stable_rank"] for s in HFScorer(base, self.config, tokenizer=self.tokenizer)
                    .score(prompt_ids, response_ids)]

    def _response_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(t) for t in ids]
        if self.strip_eos and ids and ids[-1] in _eos_ids(self.model, self.tokenizer):
            ids = ids[:-1]
        return ids

    def _tokenise_prompts(self, prompts: Sequence[Any]) -> list[list[int]]:
        if self.tokenizer is None:
            raise ConfigError("StableRankReward got no prompt_ids and has no tokenizer to rebuild them: use "
                              "SRGRPOTrainer, or set reward.tokenizer (reward.bind(trainer) does).")
        if not self._warned_retokenise:
            logger.warning("StableRankReward: the trainer passed no prompt_ids; re-tokenising the prompts as TRL "
                           "does. Use SRGRPOTrainer to score exactly the sampled prompt ids.")
            self._warned_retokenise = True
        return tokenise_prompts_like_trl(self.tokenizer, prompts, self.chat_template_kwargs)


def tokenise_prompts_like_trl(
    tokenizer: Any, prompts: Sequence[Any], chat_template_kwargs: dict[str, Any] | None = None
) -> list[list[int]]:
    """Prompt token ids as TRL 1.16's ``GRPOTrainer._tokenize_prompts`` builds them for
    text-only prompts without tools: chat messages through the chat template with the
    generation prompt, plain strings through the tokenizer."""
    out = []
    for prompt in prompts:
        if isinstance(prompt, list):
            enc = tokenizer.apply_chat_template(conversation=[prompt], add_generation_prompt=True, tokenize=True,
                                                return_dict=True, **(chat_template_kwargs or {}))
            ids = enc["input_ids"][0]
        else:
            ids = tokenizer(text=[prompt])["input_ids"][0]
        out.append([int(t) for t in ids])
    return out
