"""Tests for bon_sr.train: the SR reward (LoRA-invariant, equal to the core scorer), config
checks that fail before any weights load, the CLI's errors, and (slow) two real GRPO steps
of the offline default model on CPU."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bon_sr.errors import ConfigError, InputError
from bon_sr.scoring.hidden_states import HiddenStateConfig
from bon_sr.scoring.scorers import HFScorer
from bon_sr.train import StableRankReward, get_preset, repeated_ngram_fraction
from bon_sr.train.cli import train as train_cmd

EXAMPLE_PROMPTS = Path(__file__).resolve().parents[1] / "examples" / "train_prompts.jsonl"
EOS = 2


def _tiny_llama(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      eos_token_id=EOS, bos_token_id=1, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _lora(model: torch.nn.Module) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    from bon_sr.train.config import LORA_TARGETS

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=list(LORA_TARGETS),
                                            task_type="CAUSAL_LM"))


def _perturb_adapters(model: torch.nn.Module, seed: int) -> int:
    gen = torch.Generator().manual_seed(seed)
    touched = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
                touched += 1
    return touched


PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
COMPLETIONS = [[20, 21, 22, 23, 24, 25, EOS], [30, 31, 32], [40, 41, 42, 43, 44, 45, 46, 47, 48]]


# --------------------------------------------------------------------------- reward


@pytest.mark.parametrize("hs", [HiddenStateConfig(), HiddenStateConfig(token_set="full"),
                                HiddenStateConfig(layer=0, norm="pre", window=4, max_batch_tokens=10)],
                         ids=["response", "full", "layer0-pre-window"])
def test_reward_ignores_lora_and_equals_core_scorer(hs: HiddenStateConfig) -> None:
    base = _tiny_llama()
    reference = copy.deepcopy(base)
    policy = _lora(base)
    policy.train()  # the trainer calls the reward with the policy in train mode
    reward = StableRankReward(hs, model=policy)
    kwargs = dict(prompts=["p"] * 3, completions=["c"] * 3, completion_ids=COMPLETIONS, prompt_ids=PROMPTS)

    before = reward(**kwargs)
    assert _perturb_adapters(policy, seed=1) > 0
    after = reward(**kwargs)
    torch.testing.assert_close(torch.tensor(after), torch.tensor(before), rtol=0, atol=0)
    assert policy.training  # restored

    # The core scorer on the untouched base model, with the trailing EOS dropped as the
    # Best-of-N sampler drops it.
    responses = [c[:-1] if c[-1] == EOS else c for c in COMPLETIONS]
    core = [r["stable_rank"] for r in HFScorer(reference, hs).score(PROMPTS, responses)]
    torch.testing.assert_close(torch.tensor(after), torch.tensor(core), rtol=1e-5, atol=1e-6)

    # The perturbation is real: with adapters on, the same ids give other numbers.
    with_lora = [r["stable_rank"] for r in HFScorer(policy.eval(), hs).score(PROMPTS, responses)]
    assert max(abs(a - b) for a, b in zip(with_lora, core)) > 1e-4


def test_reward_keeps_eos_when_asked_and_logs_metrics() -> None:
    base = _tiny_llama()
    reference = copy.deepcopy(base)
    reward = StableRankReward(model=_lora(base), strip_eos=False)
    logged: dict[str, float] = {}
    got = reward(prompts=["p"], completions=["c"], completion_ids=[COMPLETIONS[0]], prompt_ids=[PROMPTS[0]],
                 log_metric=logged.__setitem__, trainer_state=None)
    core = HFScorer(reference).score([PROMPTS[0]], [COMPLETIONS[0]])[0]["stable_rank"]
    torch.testing.assert_close(torch.tensor(got[0]), torch.tensor(core), rtol=1e-5, atol=1e-6)
    assert {"stable_rank/mean", "stable_rank/min", "stable_rank/max", "completions/repeated_4gram_frac"} <= set(logged)


def test_reward_refuses_a_policy_without_adapters_unless_given_a_frozen_model() -> None:
    policy = _tiny_llama()                       # full fine-tuning: no LoRA adapters
    reference = copy.deepcopy(policy)
    kwargs = dict(prompts=["p"], completions=["c"], completion_ids=[COMPLETIONS[1]], prompt_ids=[PROMPTS[1]])
    with pytest.raises(ConfigError, match="no LoRA adapters"):
        StableRankReward(model=policy)(**kwargs)
    frozen = copy.deepcopy(reference)
    reward = StableRankReward(model=policy, reward_model=frozen)
    before = reward(**kwargs)
    with torch.no_grad():
        for p in policy.parameters():            # training moves the policy ...
            p.add_(0.1)
    assert reward(**kwargs) == before            # ... but not the reward
    core = HFScorer(reference).score([PROMPTS[1]], [COMPLETIONS[1]])[0]["stable_rank"]
    torch.testing.assert_close(torch.tensor(before[0]), torch.tensor(core), rtol=1e-5, atol=1e-6)


def test_reward_without_model_says_how_to_bind() -> None:
    with pytest.raises(ConfigError, match="bind"):
        StableRankReward()(prompts=["p"], completions=["c"], completion_ids=[[1]], prompt_ids=[[1]])
    assert StableRankReward().__name__ == "stable_rank"  # what TRL names the reward in its logs


def test_repeated_ngram_fraction_by_hand() -> None:
    # a b c a b c a b, n=3: 6 trigrams (abc bca cab abc bca cab), 3 distinct -> 1 - 3/6 = 0.5
    assert repeated_ngram_fraction([1, 2, 3, 1, 2, 3, 1, 2], n=3) == 0.5
    assert repeated_ngram_fraction([1, 2, 3, 4, 5], n=4) == 0.0     # 2 distinct 4-grams
    assert repeated_ngram_fraction([7] * 10, n=4) == 1 - 1 / 7      # 7 4-grams, 1 distinct
    assert repeated_ngram_fraction([1, 2], n=4) == 0.0              # too short to repeat


def test_import_does_not_pull_trl_or_peft() -> None:
    code = ("import sys, bon_sr.train, bon_sr.train.cli; "
            "print(sorted(m for m in ('trl', 'peft', 'vllm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- config


def test_presets_follow_the_paper_and_fit_the_default_model() -> None:
    paper = get_preset("paper")
    assert (paper.lora_r, paper.lora_alpha, paper.lora_dropout) == (16, 32, 0.1)
    assert set(paper.lora_target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"}
    assert (paper.num_generations, paper.completions_per_step, paper.max_steps) == (8, 128, 400)
    assert (paper.learning_rate, paper.lr_scheduler_type, paper.warmup_ratio) == (1e-6, "cosine", 0.1)
    smoke = get_preset("cpu-smoke", max_steps=5)
    assert smoke.max_steps == 5 and smoke.model == "smollm2-135m-instruct"


@pytest.mark.parametrize("overrides, message", [
    ({"num_generations": 1}, "at least 2"),
    ({"per_device_train_batch_size": 6}, "multiple of num_generations"),
    ({"token_set": "prompt"}, "Unknown token set"),
    ({"lora_dropout": 1.5}, "lora_dropout"),
    ({"max_completion_length": 0}, "max_completion_length must be an integer >= 1"),
    ({"no_such_option": 1}, "Unknown training option"),
])
def test_bad_options_say_what_to_change(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        get_preset("cpu-smoke", **overrides)


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="Unknown preset 'fast'. Available: cpu-smoke, paper"):
        get_preset("fast")
    result = CliRunner().invoke(train_cmd, ["--preset", "fast", "--prompts", str(EXAMPLE_PROMPTS), "-o", "x"])
    assert result.exit_code != 0 and "cpu-smoke" in result.output


def test_warmup_ratio_reaches_trl_as_a_step_count(tmp_path: Path) -> None:
    # transformers 5 reads a float warmup_steps < 1 as a ratio, 4.x as a step count: a whole
    # step count means the same on both (ceil(20 * 0.1) = 2, as transformers rounds a ratio)
    from bon_sr.train.trainer import grpo_args

    args = grpo_args(get_preset("cpu-smoke", max_steps=20, warmup_ratio=0.1), tmp_path)
    assert args.warmup_steps == 2 and args.get_warmup_steps(20) == 2
    assert grpo_args(get_preset("paper", optim="adamw_torch", bf16=False), tmp_path).warmup_steps == 40


def test_lengths_that_do_not_fit_the_context() -> None:
    from transformers import LlamaConfig

    from bon_sr.train.trainer import check_against_model

    model_config = LlamaConfig(max_position_embeddings=128, num_hidden_layers=2)
    with pytest.raises(ConfigError, match=r"96\) \+ max_completion_length \(64\) = 160 tokens does not fit .* 128"):
        check_against_model(get_preset("cpu-smoke", max_completion_length=64), model_config)
    with pytest.raises(ConfigError, match="layer 5 is out of range"):
        check_against_model(get_preset("cpu-smoke", layer=5), model_config)
    check_against_model(get_preset("cpu-smoke"), model_config)  # 96 + 16 fits


def test_cli_missing_prompts_file_fails_before_loading(tmp_path: Path) -> None:
    result = CliRunner().invoke(train_cmd, ["--prompts", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "nope.jsonl' does not exist" in result.output
    assert not (tmp_path / "o").exists()


def test_no_resume_refuses_a_directory_with_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "checkpoint-3").mkdir()
    result = CliRunner().invoke(train_cmd, ["--prompts", str(EXAMPLE_PROMPTS), "-o", str(tmp_path), "--no-resume"])
    assert result.exit_code == 1 and "--resume" in result.output and "checkpoint-3" in result.output


@pytest.mark.slow
def test_cli_lengths_checked_against_the_real_model_before_weights_load(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(train_cmd, ["--prompts", str(EXAMPLE_PROMPTS), "-o", str(tmp_path / "a"),
                                       "--max-completion-length", "9000"])
    assert result.exit_code == 1 and "does not fit the model's context of 8192" in result.output
    long_prompt = tmp_path / "long.jsonl"
    long_prompt.write_text(json.dumps({"id": "essay", "prompt": "word " * 200}) + "\n")
    result = runner.invoke(train_cmd, ["--prompts", str(long_prompt), "-o", str(tmp_path / "b")])
    assert result.exit_code == 1 and "longer than max_prompt_length=96: essay" in result.output


def test_load_prompts_reads_text_and_messages() -> None:
    from bon_sr.train import load_prompts

    ps = load_prompts(EXAMPLE_PROMPTS)
    assert len(ps.prompts) == len(ps.ids) >= 4
    assert all(isinstance(p, list) and p[-1]["role"] == "user" for p in ps.prompts)
    with pytest.raises(InputError, match="does not exist"):
        load_prompts("missing.jsonl")


# --------------------------------------------------------------------------- real training


@pytest.mark.slow
def test_two_cpu_smoke_steps_train_the_adapter_only(tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from bon_sr.train import train
    from bon_sr.train.trainer import LOG_FILE

    snapshots: dict[str, dict[str, torch.Tensor]] = {}

    class Snapshot(TrainerCallback):
        def _take(self, key: str, model: torch.nn.Module) -> None:
            snapshots[key] = {n: p.detach().clone() for n, p in model.named_parameters()}

        def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
            self._take("before", model)

        def on_train_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
            self._take("after", model)

    # One thread: on a shared 2-core machine two OpenMP threads run several times slower.
    config = get_preset("cpu-smoke", torch_threads=1)
    out = tmp_path / "run"
    result = train(config, EXAMPLE_PROMPTS, out, callbacks=[Snapshot()], print_logs=False, disable_tqdm=True)
    assert result.global_step == 2 and result.seconds_per_step and result.seconds_per_step > 0

    before, after = snapshots["before"], snapshots["after"]
    lora = [n for n in before if "lora_" in n]
    base = [n for n in before if "lora_" not in n]
    assert lora and base
    assert any(not torch.equal(before[n], after[n]) for n in lora), "no adapter weight changed"
    assert all(torch.equal(before[n], after[n]) for n in base), "a base weight changed"

    rows = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("reward", "reward_std", "stable_rank/mean", "completions/mean_length", "kl",
                "completions/repeated_4gram_frac", "rewards/stable_rank/mean"):
        assert all(isinstance(r[key], float) for r in steps), key
    for r in steps:
        # one reward function of weight 1: TRL's reward is its mean; each completion's SR is at
        # most its number of scored rows (the response tokens), so the mean is at most the mean
        # length; a reward read from other rows (the prompt's too) would exceed it
        assert r["reward"] == pytest.approx(r["rewards/stable_rank/mean"])
        assert 1.0 < r["reward"] <= r["completions/mean_length"], r

    # The final adapter and the last checkpoint both reload onto the base model.
    assert (out / "adapter_model.safetensors").is_file()
    saved = load_file(str(out / "checkpoint-2" / "adapter_model.safetensors"))
    trained = {n: t for n, t in after.items() if "lora_" in n}
    assert len(saved) == len(trained)
    from transformers import AutoModelForCausalLM

    from bon_sr.models import resolve_model

    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(resolve_model(config.model), dtype=torch.float32), out / "checkpoint-2")
    reloaded_lora = {n: p for n, p in reloaded.named_parameters() if "lora_" in n}
    for name, tensor in trained.items():
        torch.testing.assert_close(reloaded_lora[name], tensor)

    # Resuming with a higher max_steps continues from checkpoint-2 and runs one more step;
    # resuming at max_steps runs none.
    again = train(get_preset("cpu-smoke", torch_threads=1, max_steps=3), EXAMPLE_PROMPTS, out, resume=True,
                  print_logs=False, disable_tqdm=True)
    assert again.resumed_from is not None and again.resumed_from.endswith("checkpoint-2")
    assert again.global_step == 3
    rows = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows if "reward" in r] == [1, 2, 3]
    done = train(config, EXAMPLE_PROMPTS, out, resume=True, print_logs=False, disable_tqdm=True)
    assert done.global_step == 3 and done.seconds_per_step is None


def test_missing_train_extra_names_the_pip_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import bon_sr.train.trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "find_spec", lambda name: None if name == "trl" else find_spec(name))
    result = CliRunner().invoke(train_cmd, ["--prompts", str(EXAMPLE_PROMPTS), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "pip install 'bon-sr[train]'" in result.output
