"""Speed and accuracy of the stable-rank estimators, side by side in one process.

Contenders, all fed the same batch (B, T, d) in the chosen dtype:
  svdvals32  torch.linalg.svdvals in float32 (what a user would write by hand)
  exact64    bon_sr.scoring.stable_rank.stable_rank_exact (float64 SVD; the reference)
  fast       bon_sr.scoring.stable_rank.stable_rank(backend="torch") (block subspace iteration,
             exact fallback; the pure-torch estimator)
  triton     bon_sr.scoring.stable_rank.stable_rank(backend="triton") (the fused kernel; only on
             CUDA with triton importable)

Two kinds of batch: "hidden" (decaying column scales plus 3 massive-activation columns,
the large spectral gap real last-layer states show) and "gauss" (structureless Gaussian,
the slow case for any power-type method). Prints, per shape and kind, the median ms of
each contender after a warm-up, the speed-up of fast over svdvals32, and the maximum
relative error of SR against exact64. On CUDA it also measures the copy bandwidth once
(a 2 GiB clone, read + write bytes / time) and prints the memory floor of each shape,
bytes of H / bandwidth: the time to read the batch once.

    python benchmarks/estimator.py --quick          # about a minute on 2 CPU cores
    python benchmarks/estimator.py                  # CPU: a subset that takes minutes
    python benchmarks/estimator.py --full --device cuda --dtype bf16
    # the issue-6 grid on a GPU, results written for benchmarks/results/:
    python benchmarks/estimator.py --device cuda --dtype bf16 --full --widths 1536,4096 \
        --svd-repeats 1 --repeats 10 --json benchmarks/results/estimator-h100.json
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from bon_sr.scoring.stable_rank import stable_rank, stable_rank_exact

BATCHES = (16, 64)
LENGTHS = (512, 2048)
WIDTHS = (576, 1536, 4096)
QUICK_SHAPES = ((16, 512, 576), (16, 512, 1536))
# A batched SVD costs about B * T * d * min(T, d) flop-units; on 2 CPU cores float32
# svdvals runs about 5e9 of them per second. Shapes whose float64 reference would take
# more than ~10 s per call are skipped on CPU unless --full.
CPU_UNITS_PER_S = 5e9
CPU_MAX_UNITS = 3e10
CPU_MAX_FP64_BYTES = 4 * 2**30
# On a GPU the float64 SVD of the largest grid shape alone takes minutes per call.
CUDA_MAX_UNITS = 3e11


def make_batch(kind: str, B: int, T: int, d: int, device: torch.device, seed: int) -> torch.Tensor:
    """A float32 (B, T, d) batch: 'hidden' (gap + decaying spectrum) or 'gauss'."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(B, T, d, generator=gen)
    if kind == "hidden":
        # column scales decaying like 1/sqrt(j) give a smoothly decaying spectrum; three
        # columns with a large common offset play the massive-activation dimensions
        h *= (1.0 + torch.arange(d, dtype=torch.float32)) ** -0.5 * 4.0
        cols = torch.randperm(d, generator=gen)[:3]
        h[:, :, cols] += 25.0 + 3.0 * torch.randn(B, T, 3, generator=gen)
    return h.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, warmup: bool = True) -> tuple[float, object]:
    """Median wall time in ms over `repeats` calls (after one untimed warm-up call)."""
    if warmup:
        fn()
        sync(device)
    out = None
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def rel_err(sr: torch.Tensor, ref: torch.Tensor) -> float:
    sr, ref = sr.double().cpu(), ref.double().cpu()
    return ((sr - ref).abs() / ref).max().item()


def copy_bandwidth(device: torch.device, nbytes: int = 2 * 2**30) -> float:
    """Bytes per second a large clone moves (read + write counted), median of 5."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    ms, _ = timed(lambda: x.clone(), device, 5)
    del x
    return 2 * nbytes / (ms / 1e3)


def triton_contender(device: torch.device) -> str | None:
    """Why the Triton kernel is left out, or None when it runs here."""
    if device.type != "cuda":
        return "the Triton kernel runs on CUDA only"
    if importlib.util.find_spec("triton") is None:
        return "triton is not importable"
    return None


def plan(args: argparse.Namespace, device: torch.device) -> tuple[list, list]:
    if args.quick:
        shapes = list(QUICK_SHAPES)
    else:
        widths = WIDTHS if args.widths is None else tuple(int(w) for w in args.widths.split(","))
        shapes = list(itertools.product(BATCHES, LENGTHS, widths))
    run, skipped = [], []
    for B, T, d in shapes:
        units = B * T * d * min(T, d)
        if device.type == "cpu" and not args.full and not args.quick:
            if units > CPU_MAX_UNITS:
                est = units / CPU_UNITS_PER_S
                skipped.append(((B, T, d), f"svdvals32 alone ~{est:.0f} s per call on CPU; --full runs it"))
                continue
            if B * T * d * 8 > CPU_MAX_FP64_BYTES:
                skipped.append(((B, T, d), "float64 copy over 4 GiB of RAM; --full runs it"))
                continue
        if device.type == "cuda" and not args.full and units > CUDA_MAX_UNITS:
            skipped.append(((B, T, d), "float64 SVD reference takes minutes per call; --full runs it"))
            continue
        run.append((B, T, d))
    return run, skipped


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="two small shapes, for a smoke run")
    parser.add_argument("--full", action="store_true", help="every shape, even the slow ones on CPU")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                        help="where to run (auto: cuda when available)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                        help="dtype of the hidden-state batch handed to every contender")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per contender (median reported); default 3, 1 with --quick")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 is steadier on a busy machine")
    parser.add_argument("--kinds", default="hidden,gauss", help="comma list of batch kinds: hidden, gauss")
    parser.add_argument("--widths", default=None,
                        help="comma list of d to run (default: 576,1536,4096); the issue grid is 1536,4096")
    parser.add_argument("--svd-repeats", type=int, default=None,
                        help="timed calls for svdvals32 and exact64 (default: --repeats); 1 also skips "
                             "their warm-up, which keeps the largest shapes to minutes on a GPU")
    parser.add_argument("--json", metavar="OUT", default=None,
                        help="also write every row, the device and the bandwidth to this JSON file")
    args = parser.parse_args()

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda asked for, but torch sees no CUDA device")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if repeats < 1:
        parser.error("--repeats must be >= 1")
    svd_repeats = args.svd_repeats if args.svd_repeats is not None else repeats
    if svd_repeats < 1:
        parser.error("--svd-repeats must be >= 1")
    if args.widths is not None:
        try:
            if any(int(w) < 1 for w in args.widths.split(",")):
                raise ValueError
        except ValueError:
            parser.error(f"--widths must be a comma list of positive ints, got {args.widths!r}")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    for k in kinds:
        if k not in ("hidden", "gauss"):
            parser.error(f"unknown kind {k!r}; available: hidden, gauss")

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu, {torch.get_num_threads()} threads"
    no_triton = triton_contender(device)
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
    print(f"torch {torch.__version__} on {name}; input dtype {args.dtype}; "
          f"median of {repeats} after 1 warm-up (svdvals32/exact64: {svd_repeats}"
          f"{'' if args.svd_repeats is None or svd_repeats > 1 else ', no warm-up'})")
    if bandwidth is not None:
        print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (clone, read + write); floor = bytes of H / that")
    if no_triton:
        print(f"triton contender left out: {no_triton}")
    print("errors: max relative error of SR vs exact64 over the batch; passes: mean/max per item\n")
    shapes, skipped = plan(args, device)
    if device.type == "cuda":
        # cuSOLVER's first call initialises handles; keep that out of the first shape's time
        torch.linalg.svdvals(torch.randn(4, 64, 64, device=device))
        sync(device)

    header = (f"{'B x T x d':>16} {'kind':>6} {'svdvals32':>10} {'exact64':>10} {'fast':>9} "
              f"{'triton':>9} {'floor':>8} {'tri/floor':>9} {'svd/tri':>8} {'fast/tri':>8} "
              f"{'err svd32':>10} {'err fast':>10} {'err tri':>10} {'passes':>8}")
    print(header)
    print("-" * len(header))
    rows = []
    t_start = time.perf_counter()
    for (B, T, d), kind in itertools.product(shapes, kinds):
        label = f"{B} x {T} x {d}"
        try:
            h = make_batch(kind, B, T, d, device, seed=B + T + d).to(dtype)
            # one SVD call per shape when --svd-repeats 1 asks for it (the largest take minutes)
            warm = args.svd_repeats is None or svd_repeats > 1
            ms_exact, ref = timed(lambda: stable_rank_exact(h), device, svd_repeats, warm)
            ms_svd, sv = timed(lambda: torch.linalg.svdvals(h.float()), device, svd_repeats, warm)
            ms_fast, fast = timed(lambda: stable_rank(h, backend="torch"), device, repeats)
            ms_tri, tri = (None, None)
            if no_triton is None:
                ms_tri, tri = timed(lambda: stable_rank(h, backend="triton"), device, repeats)
        except (torch.OutOfMemoryError, MemoryError) as exc:
            print(f"{label:>16} {kind:>6}  skipped: out of memory ({type(exc).__name__})")
            skipped.append(((B, T, d), f"{kind}: out of memory"))
            continue
        hf = h.float()
        sr_svd = hf.square().sum(dim=(1, 2)) / sv[:, 0].square()
        del hf
        floor = h.numel() * h.element_size() / bandwidth * 1e3 if bandwidth else None
        row = {
            "B": B, "T": T, "d": d, "kind": kind, "dtype": args.dtype,
            "ms": {"svdvals32": ms_svd, "exact64": ms_exact, "fast": ms_fast, "triton": ms_tri},
            "floor_ms": floor,
            "max_rel_err": {"svdvals32": rel_err(sr_svd, ref.stable_rank),
                            "fast": rel_err(fast.stable_rank, ref.stable_rank),
                            "triton": rel_err(tri.stable_rank, ref.stable_rank) if tri is not None else None},
            "passes_fast": {"mean": fast.iterations.float().mean().item(), "max": int(fast.iterations.max())},
            "passes_triton": ({"mean": tri.iterations.float().mean().item(), "max": int(tri.iterations.max())}
                              if tri is not None else None),
        }
        rows.append(row)
        it = (tri if tri is not None else fast).iterations.float()

        def fmt(x, spec):
            return format(x, spec) if x is not None else format("-", spec.split(".")[0])

        print(f"{label:>16} {kind:>6} {ms_svd:>10.1f} {ms_exact:>10.1f} {ms_fast:>9.2f} "
              f"{fmt(ms_tri, '>9.3f')} {fmt(floor, '>8.3f')} "
              f"{fmt(ms_tri / floor if ms_tri and floor else None, '>8.1f')}x "
              f"{fmt(ms_svd / ms_tri if ms_tri else None, '>7.0f')}x "
              f"{fmt(ms_fast / ms_tri if ms_tri else None, '>7.1f')}x "
              f"{row['max_rel_err']['svdvals32']:>10.1e} {row['max_rel_err']['fast']:>10.1e} "
              f"{fmt(row['max_rel_err']['triton'], '>10.1e')} "
              f"{it.mean().item():>4.0f}/{it.max().item():<3.0f}", flush=True)
        del h, ref, sv, fast, tri
    wall = time.perf_counter() - t_start
    print(f"\nwall time {wall:.0f} s")
    for (B, T, d), why in skipped:
        print(f"skipped {B} x {T} x {d}: {why}")
    if args.json:
        triton_version = None
        if importlib.util.find_spec("triton") is not None:
            import triton

            triton_version = triton.__version__
        out = {
            "device": name, "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(), "dtype": args.dtype, "repeats": repeats,
            "svd_repeats": svd_repeats, "copy_bandwidth_bytes_per_s": bandwidth,
            "triton_left_out": no_triton, "rows": rows,
            "skipped": [{"B": B, "T": T, "d": d, "why": why} for (B, T, d), why in skipped],
            "wall_s": wall,
        }
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
