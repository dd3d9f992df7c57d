"""One option resolver for every interface (bon_sr.options): an option's error names it as the
CLI, the API and the server spell it, from the same check."""

from __future__ import annotations

import inspect
import json

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from conftest import FakeEngine

from bon_sr import BestOfN
from bon_sr.cli import generate
from bon_sr.errors import SPELLINGS, OptionError, spell
from bon_sr.options import resolve
from bon_sr.sampling import SamplingConfig
from bon_sr.serve.app import create_app
from bon_sr.serve.protocol import BonSROptions
from bon_sr.serve.settings import ServeSettings

MODEL = "smollm2-135m-instruct"


def _server(tokenizer):
    settings = ServeSettings(model=MODEL, sampling=SamplingConfig(n=4, max_new_tokens=16), max_n=8)
    return TestClient(create_app(FakeEngine(tokenizer), settings))


@pytest.mark.parametrize("option, api, server", [
    ("answer_regex", {"selector": "majority", "answer_regex": "("}, {"selector": "majority", "answer_regex": "("}),
    ("answer", {"selector": "majority"}, {"selector": "majority"}),
    ("utility", {"selector": "mbr", "utility": "nope"}, {"selector": "mbr", "utility": "nope"}),
])
def test_one_option_error_reaches_the_cli_the_api_and_the_server(tmp_path, tiny_tokenizer, option, api, server):
    # the API: before any model is resolved or loaded
    with pytest.raises(OptionError) as api_err:
        BestOfN(MODEL, **api)
    assert api_err.value.option == option and spell(option, "api") in str(api_err.value)
    # the CLI: the same check, spelled with the flag, before any model loads
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "2+2?"}) + "\n")
    args = [str(prompts), "-o", str(tmp_path / "out.jsonl")]
    for key, value in api.items():
        args += [spell(key, "cli"), value]
    if option == "utility":  # click's Choice refuses an unknown utility name itself
        args = [a for a in args if a not in ("--utility", "nope")]
        result = CliRunner().invoke(generate, args + ["--utility", "nope"])
        assert result.exit_code == 2 and "--utility" in result.output
    else:
        result = CliRunner().invoke(generate, args)
        assert result.exit_code == 1, result.output
        assert spell(option, "cli") in result.output
    assert not (tmp_path / "out.jsonl").exists()
    # the server: a 400 whose param is the request's field
    with _server(tiny_tokenizer) as client:
        r = client.post("/v1/chat/completions", json={"model": MODEL, "bon_sr": server,
                                                      "messages": [{"role": "user", "content": "2+2?"}]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == spell(option, "server") == SPELLINGS[option][2]
    if option != "utility":  # "Unknown utility 'nope'": the param names the field
        assert spell(option, "server") in error["message"]


def test_spellings_match_each_interface():
    from bon_sr.cli import generate as cli_generate

    flags = {opt for p in cli_generate.params for opt in p.opts + p.secondary_opts}
    keywords = set(inspect.signature(BestOfN).parameters) | set(inspect.signature(BestOfN.select).parameters)
    fields = set(BonSROptions.model_fields)
    openai_fields = {"temperature", "top_p", "max_tokens", "stop", "seed"}
    for option, (cli, api, server) in SPELLINGS.items():
        if cli.startswith("--"):
            assert set(cli.split("/")) <= flags, (option, cli)
        assert api in keywords, (option, api)
        if server is not None:
            assert server.removeprefix("bon_sr.") in fields or server in openai_fields, (option, server)


def test_the_plan_resolves_scorer_and_keys_without_a_model():
    plan = resolve(selector="mean-logprob", backend="hf")
    assert plan.scorer == "hf" and "mean_logprob" in plan.score_keys and plan.logit_stats
    assert resolve(selector="majority", answer="numeric", backend="hf").score_keys == frozenset()
    with pytest.raises(OptionError) as err:
        resolve(backend="hf", scorer="hook")
    assert err.value.option == "scorer"
    assert "--backend vllm" in err.value.render("cli") and "backend='vllm'" in str(err.value)
    assert "bon_sr.scorer" not in err.value.render("server") and "the server's --scorer 'hf'" in err.value.render("server")


def test_seed_for_derives_or_checks_the_override():
    plan = resolve(backend="hf", sampling={"seed": 5})
    assert plan.seed_for("a") == plan.seed_for("a") != plan.seed_for("b")
    assert plan.seed_for("a", 7) == 7
    with pytest.raises(OptionError) as err:
        plan.seed_for("a", -1)
    assert err.value.option == "seed" and "--seed" in err.value.render("cli")
