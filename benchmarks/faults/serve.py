"""`bon-sr serve` under abuse: client disconnects, malformed and oversized bodies, a slow body,
then sequential requests with the server's memory sampled."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .proc import ROOT, is_running, base_env, descendants, still_alive

def serve_faults(port: int, requests: int, work: Path, model: str) -> dict[str, Any]:
    """Abuse a real `bon-sr serve`: client disconnects mid-request, malformed and oversized
    bodies, a slow body, then ``requests`` sequential requests with the server's RSS sampled."""
    import socket

    import psutil

    env = base_env()
    log = (work / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "bon_sr.cli", "serve", "--model", model, "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    result: dict[str, Any] = {}
    try:
        _wait_ready(base, proc, 600)
        body = {"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8, "seed": 1,
                "bon_sr": {"n": 2}}

        def post(payload: bytes, *, timeout: float = 120, headers: dict[str, str] | None = None) -> tuple[int, Any]:
            import urllib.error
            import urllib.request

            req = urllib.request.Request(base + "/v1/chat/completions", data=payload, method="POST",
                                         headers={"Content-Type": "application/json", **(headers or {})})
            try:
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    return resp.status, json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                raw = exc.read()
                try:
                    return exc.code, json.loads(raw)
                except json.JSONDecodeError:
                    return exc.code, raw[:200]

        good = json.dumps(body).encode()
        status, first = post(good)
        result["first"] = status
        reference_text = first["choices"][0]["message"]["content"] if status == 200 else None
        # Client disconnects mid-request (after sending the body, before the answer).
        for _ in range(5):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(good)}\r\n\r\n".encode() + good)
            time.sleep(0.3)
            s.close()
        bad_bodies = {"malformed": b'{"model": "x", "messages": [', "not-json": b"\xff\xfe\x00garbage",
                      "wrong-types": json.dumps({"model": model, "messages": "hi", "n": "two"}).encode(),
                      "n-too-large": json.dumps({**body, "bon_sr": {"n": 10_000}}).encode(),
                      "oversized": json.dumps({**body, "messages": [{"role": "user",
                                                                     "content": "x " * 6_000_000}]}).encode()}
        result["bad"] = {}
        for name, payload in bad_bodies.items():
            try:
                status, answer = post(payload, timeout=120)
            except Exception as exc:  # a dropped connection counts as handled if the server lives on
                status, answer = -1, f"{type(exc).__name__}: {exc}"
            result["bad"][name] = status
        # A slow body: headers promise 1000 bytes, 10 arrive, then nothing.
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n" + good[:10])
        s.settimeout(90)
        t0 = time.time()
        try:
            reply = s.recv(200)
        except socket.timeout:
            reply = b""
        result["slow_body"] = {"closed_after_s": round(time.time() - t0, 1), "reply": reply[:60].decode("latin1")}
        s.close()
        # Sequential load with RSS (server + engine processes) sampled.
        server = psutil.Process(proc.pid)
        rss, wrong, failed, differ = [], 0, 0, 0
        t0 = time.time()
        for i in range(requests):
            status, answer = post(good)
            if status != 200:
                failed += 1
                continue
            choice = (answer.get("choices") or [{}])[0]
            text = (choice.get("message") or {}).get("content")
            if not isinstance(text, str) or "bon_sr" not in answer:
                wrong += 1      # not a well-formed Best-of-N answer
            elif text != reference_text:
                differ += 1     # same seed, another pick (vLLM bf16 on CPU is not bit-stable)
            if i % 10 == 0:
                procs = [server, *server.children(recursive=True)]
                rss.append((i, sum(p.memory_info().rss for p in procs if is_running(p)) / 2**20))
        result.update(requests=requests, failed=failed, wrong=wrong, differ=differ,
                      seconds=round(time.time() - t0, 1),
                      rss_mib=[round(r, 1) for _, r in rss], alive=proc.poll() is None)
        result["rss_slope_mib_per_100"] = round(_slope(rss) * 100, 2)
    finally:
        kids = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        result["orphans_after_stop"] = still_alive(kids)
        log.close()
    return result


def _wait_ready(base: str, proc: subprocess.Popen, timeout: float) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bon-sr serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as resp:
                if resp.status == 200 and json.loads(resp.read()).get("status") in ("ok", "ready"):
                    return
        except Exception:
            pass
        time.sleep(1)
    raise RuntimeError("bon-sr serve did not become ready")


def _slope(points: Sequence[tuple[float, float]]) -> float:
    if len(points) < 2:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0
