"""One default per option: the CLI commands, the API and the server take theirs from
``SamplingConfig`` and ``HiddenStateConfig``, and the configs that embed those agree.

Reads click's parameter objects and Python signatures; loads no model, starts no process.
"""

from __future__ import annotations

import inspect
from dataclasses import fields

import pytest

from bon_sr.api import BestOfN, select_best
from bon_sr.bench.cli import bench as bench_cmd
from bon_sr.bench.runner import BenchConfig
from bon_sr.cli import generate as generate_cmd
from bon_sr.cli import score as score_cmd
from bon_sr.scoring.hidden_states import HiddenStateConfig
from bon_sr.sampling import SamplingConfig
from bon_sr.serve.cli import serve as serve_cmd
from bon_sr.serve.settings import ServeSettings
from bon_sr.train.config import TrainConfig, get_preset

SAMPLING = SamplingConfig()
SCORING = HiddenStateConfig()

#: SamplingConfig field -> the option's name in each place (None: the place has no such option)
SAMPLING_NAMES = {
    #            generate          score   serve          bench          BestOfN
    "n": ("n", None, "n", None, "n"),
    "temperature": ("temperature", None, "temperature", "temperature", "temperature"),
    "top_p": ("top_p", None, "top_p", "top_p", "top_p"),
    "max_new_tokens": ("max_new_tokens", None, "max_tokens", None, "max_new_tokens"),
    "seed": ("seed", "seed", "seed", "seed", "seed"),
    "greedy": ("greedy", None, None, None, "greedy"),
}
SCORING_NAMES = {
    #            generate/score CLI     BestOfN
    "token_set": ("token_set", "token_set"),
    "layer": ("layer", "layer"),
    "norm": ("norm", "norm"),
    "window": ("window", "window"),
    "transform": ("transform", "transform"),
    "max_batch_tokens": ("batch_tokens", "max_batch_tokens"),
}


def _cli_defaults(command) -> dict:
    # a flag declared without default= is off (click 8.3 stores an UNSET sentinel for it)
    return {p.name: (False if getattr(p, "is_flag", False) and not isinstance(p.default, bool) else p.default)
            for p in command.params}


def _api_defaults() -> dict:
    return {name: p.default for name, p in inspect.signature(BestOfN.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_the_default_n_is_eight_everywhere() -> None:
    # docs/cli.md states it ("The default n is 8 everywhere"); serve said 4 and the rest 8 before they shared one place
    assert SAMPLING.n == 8
    assert _cli_defaults(generate_cmd)["n"] == _cli_defaults(serve_cmd)["n"] == _api_defaults()["n"] == 8
    assert ServeSettings().sampling.n == 8


@pytest.mark.parametrize("field", sorted(SAMPLING_NAMES))
def test_sampling_defaults_agree(field: str) -> None:
    want = getattr(SAMPLING, field)
    generate, score, serve, bench, api = SAMPLING_NAMES[field]
    places = [(generate_cmd, generate), (score_cmd, score), (serve_cmd, serve), (bench_cmd, bench)]
    for command, name in places:
        if name is not None:
            assert _cli_defaults(command)[name] == want, f"bon-sr {command.name} --{name}"
    assert _api_defaults()[api] == want, f"BestOfN({api}=)"
    assert getattr(ServeSettings().sampling, field) == want
    if field not in ("n", "max_new_tokens"):  # the bench's n is a sweep; its budget is the task's
        assert getattr(BenchConfig(task="gsm8k").sampling, field) == want


@pytest.mark.parametrize("field", sorted(SCORING_NAMES))
def test_scoring_defaults_agree(field: str) -> None:
    want = getattr(SCORING, field)
    cli, api = SCORING_NAMES[field]
    assert _cli_defaults(generate_cmd)[cli] == want
    assert _cli_defaults(score_cmd)[cli] == want
    assert _api_defaults()[api] == want
    assert getattr(ServeSettings().scoring, field) == want
    assert getattr(BenchConfig(task="gsm8k").scoring, field) == want
    assert getattr(TrainConfig().scoring, field) == want
    if field == "token_set":
        assert _cli_defaults(serve_cmd)["token_set"] == want
    if field == "max_batch_tokens":
        assert _cli_defaults(bench_cmd)["max_batch_tokens"] == want


def test_every_sampling_and_scoring_field_is_compared() -> None:
    assert set(SAMPLING_NAMES) | {"stop"} == {f.name for f in fields(SamplingConfig)}
    assert set(SCORING_NAMES) == {f.name for f in fields(HiddenStateConfig)}


def test_select_best_passes_its_options_to_best_of_n() -> None:
    # select_best declares no sampling or scoring option of its own, so it cannot disagree
    own = set(inspect.signature(select_best).parameters)
    assert own == {"prompt", "candidates", "model", "options"}


def test_the_configs_that_embed_them_run_the_same_checks() -> None:
    from bon_sr.errors import ConfigError

    with pytest.raises(ConfigError, match="top_p must be in"):
        ServeSettings(sampling=SamplingConfig(top_p=0))
    with pytest.raises(ConfigError, match="top_p must be in"):
        get_preset("cpu-smoke", top_p=1.5)
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        get_preset("cpu-smoke", temperature=0)
    with pytest.raises(ConfigError, match="Unknown token set"):
        get_preset("cpu-smoke", token_set="prompt")
    assert get_preset("cpu-smoke", layer=3, window=5).scoring == HiddenStateConfig(layer=3, window=5,
                                                                                   max_batch_tokens=2048)
    with pytest.raises(ConfigError, match="bon-sr ablate"):
        BenchConfig(task="gsm8k", scoring=HiddenStateConfig(layer=3))
    config = BenchConfig(task="gsm8k", n=(1, 4), max_new_tokens=64)
    assert (config.sampling.n, config.sampling.max_new_tokens) == (4, 64)
    assert BenchConfig(task="gsm8k", n=(2,)).sampling_for(512).max_new_tokens == 512


def test_train_keeps_trls_names_and_sampling_defaults() -> None:
    config = TrainConfig()
    assert (config.temperature, config.top_p) == (1.0, 1.0)   # GRPOConfig's defaults
    sampling = config.sampling_config()
    assert (sampling.n, sampling.max_new_tokens) == (config.num_generations, config.max_completion_length)


def test_one_default_selector_and_utility_everywhere() -> None:
    from bon_sr.options import resolve
    from bon_sr.selection.consensus import DEFAULT_UTILITY
    from bon_sr.selection.selectors import DEFAULT_SELECTOR

    for cmd in (generate_cmd, score_cmd, serve_cmd):
        assert _cli_defaults(cmd)["selector"] == DEFAULT_SELECTOR, cmd.name
    assert _cli_defaults(generate_cmd)["utility"] == _cli_defaults(serve_cmd)["utility"] == DEFAULT_UTILITY
    assert inspect.signature(BestOfN).parameters["selector"].default == DEFAULT_SELECTOR
    assert inspect.signature(resolve).parameters["selector"].default == DEFAULT_SELECTOR
    assert ServeSettings().selector == DEFAULT_SELECTOR and ServeSettings().utility == DEFAULT_UTILITY
