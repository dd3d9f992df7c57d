"""``bon-sr serve``: parse the flags, build the settings and the app, run uvicorn.

Heavy imports (FastAPI, uvicorn, vLLM) happen inside the command; ``bon_sr.cli`` imports
this module on every start to register the command.
"""

from __future__ import annotations

from typing import Any

import click

from ..selection.answers import ANSWER_FORMATS
from ..selection.consensus import DEFAULT_UTILITY, UTILITIES
from ..scoring.hidden_states import HiddenStateConfig
from ..models import DEFAULT_MODEL
from ..sampling import SamplingConfig
from ..selection.selectors import DEFAULT_SELECTOR, SELECTORS

SERVE_EXAMPLE = """
\b
Example:
  bon-sr serve --model smollm2-135m-instruct --port 8000 --n 8 --max-n 32

\b
  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
  r = client.chat.completions.create(model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "What is 12 * 7?"}], max_tokens=64,
        extra_body={"bon_sr": {"n": 8, "selector": "majority", "answer": "numeric"}})
  print(r.choices[0].message.content, r.model_extra["bon_sr"]["selected_index"])

\b
GET /health answers 503 while the model loads, then 200. Streamed replies (stream=true)
start after Best-of-N has finished: the selected answer is sent as SSE chunks.
"""


@click.command(epilog=SERVE_EXAMPLE)
@click.option("-m", "--model", default=DEFAULT_MODEL, show_default=True,
              help="Built-in alias, local HF model directory, or Hugging Face id.")
@click.option("--served-model-name", default=None, help="The name clients send as 'model' (default: --model).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=int, default=8000, show_default=True, help="Port to bind.")
@click.option("--api-key", envvar="BON_SR_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1/* (also read from BON_SR_API_KEY).")
@click.option("-n", "--n", "n", type=int, default=SamplingConfig.n, show_default=True,
              help="Candidates per request unless the request sets bon_sr.n.")
@click.option("--max-n", type=int, default=64, show_default=True, help="Largest bon_sr.n a request may ask for.")
@click.option("--selector", type=click.Choice(sorted(SELECTORS)), default=DEFAULT_SELECTOR, show_default=True,
              help="Default selector (a request may set bon_sr.selector).")
@click.option("--answer", type=click.Choice(sorted(ANSWER_FORMATS)), default=None,
              help="Default answer extractor (needed by the voting selectors).")
@click.option("--answer-regex", default=None, metavar="PATTERN", help="Default answer regex instead of --answer.")
@click.option("--utility", type=click.Choice(sorted(UTILITIES)), default=DEFAULT_UTILITY, show_default=True,
              help="Default similarity of the consensus selectors (mbr, auto); a request may set bon_sr.utility.")
@click.option("--token-set", type=click.Choice(["response", "full"]), default=HiddenStateConfig.token_set,
              show_default=True,
              help="Default tokens whose hidden states are scored.")
@click.option("--temperature", type=float, default=SamplingConfig.temperature, show_default=True,
              help="Default sampling temperature.")
@click.option("--top-p", type=float, default=SamplingConfig.top_p, show_default=True,
              help="Default nucleus sampling top-p.")
@click.option("--max-tokens", type=int, default=SamplingConfig.max_new_tokens, show_default=True,
              help="Default tokens per candidate.")
@click.option("--seed", type=int, default=SamplingConfig.seed, show_default=True,
              help="Run seed: a request without 'seed' samples with one derived from it and the request's id.")
@click.option("--max-body-bytes", type=int, default=1 << 20, show_default=True,
              help="Larger request bodies are refused with 413.")
@click.option("--body-timeout", type=float, default=30.0, show_default=True,
              help="Seconds a client may take to send its request body; slower ones get 408.")
@click.option("--dtype", default="auto", show_default=True, help="auto, bfloat16, float16 or float32.")
@click.option("--vllm-opt", "vllm_opts", multiple=True, metavar="KEY=VALUE",
              help="vLLM backend option (repeatable), as for generate: kv_cache_memory_bytes=2147483648, "
                   "max_model_len=4096, engine_kwargs='{\"max_num_seqs\": 64}'.")
@click.option("--tensor-parallel-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="vLLM tensor parallelism: GPUs the engine spans.")
@click.option("--data-parallel-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="vLLM data parallelism on this node: engine cores (each with its own GPUs); a request's "
                   "candidates are sampled and scored on one of them.")
@click.option("--hook-memory", type=click.IntRange(min=1), default=None,
              help="Bytes of hidden-state rows scored requests may hold at once; past it new ones wait "
                   "(default: rows for twice the KV cache's tokens).")
@click.option("--hook-queue", type=click.IntRange(min=0), default=256, show_default=True,
              help="Scored requests that may wait for --hook-memory; past it the server answers 503 + Retry-After.")
@click.option("--allow-code-execution", is_flag=True,
              help="Let requests use answer 'python': each candidate's code runs on its prompt's examples in "
                   "bon-sr's sandbox (needs user namespaces). Off by default.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True, help="uvicorn's log level.")
def serve(host: str, port: int, vllm_opts: tuple[str, ...], log_level: str, n: int, temperature: float,
          top_p: float, max_tokens: int, seed: int, token_set: str, **options: Any) -> None:
    """Serve Best-of-N behind an OpenAI-compatible API (/v1/chat/completions, /v1/completions)."""
    from ..cli_runtime import click_error, parse_options
    from ..errors import BonSRError
    from .settings import ServeSettings

    try:
        sampling = SamplingConfig(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_tokens, seed=seed)
        settings = ServeSettings(sampling=sampling, scoring=HiddenStateConfig(token_set=token_set),
                                 vllm_options=parse_options(vllm_opts), **options)
        if settings.allow_code_execution:
            from ..selection.answers import sandbox_ready

            sandbox_ready()  # refuse to start where code cannot be contained
    except BonSRError as exc:
        raise click_error(exc) from exc
    import logging

    import uvicorn

    # bon_sr.cli keeps library logs at WARNING; the server's own lines follow --log-level.
    logging.getLogger("bon_sr.serve").setLevel(log_level.upper())
    if settings.allow_code_execution:
        click.echo("bon-sr serve: --allow-code-execution: requests with answer 'python' run model-written code in "
                   "bon-sr's sandbox (no network, no host files, bounded CPU/memory/processes).", err=True)

    from .app import create_app
    from .engine import BonEngine

    engine = BonEngine(settings)
    # timeout_graceful_shutdown=None: on SIGTERM, in-flight Best-of-N requests finish.
    config = uvicorn.Config(None, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=None)
    server = uvicorn.Server(config)
    config.app = create_app(engine, settings, on_failure=lambda: setattr(server, "should_exit", True))
    server.run()
    if engine.state == "failed":
        raise click.ClickException(f"The model did not load: {engine.error}")
