"""Speed and accuracy of the stable-rank estimators, side by side in one process.

Contenders, all fed the same batch (B, T, d) in the chosen dtype:
  svdvals32  torch.linalg.svdvals in float32 (what a user would write by hand)
  exact64    bon_sr.stable_rank.stable_rank_exact (float64 SVD; the reference)
  fast       bon_sr.stable_rank.stable_rank (block subspace iteration, exact fallback)

Two kinds of batch: "hidden" (decaying column scales plus 3 massive-activation columns,
the large spectral gap real last-layer states show) and "gauss" (structureless Gaussian,
the slow case for any power-type method). Prints, per shape and kind, the median ms of
each contender after a warm-up, the speed-up of fast over svdvals32, and the maximum
relative error of SR against exact64.

    python benchmarks/estimator.py --quick          # about a minute on 2 CPU cores
    python benchmarks/estimator.py                  # CPU: a subset that takes minutes
    python benchmarks/estimator.py --full --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from bon_sr.stable_rank import stable_rank, stable_rank_exact

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


def timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    """Median wall time in ms over `repeats` calls (after one untimed warm-up call)."""
    out = fn()
    sync(device)
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


def plan(args: argparse.Namespace, device: torch.device) -> tuple[list, list]:
    if args.quick:
        shapes = list(QUICK_SHAPES)
    else:
        shapes = list(itertools.product(BATCHES, LENGTHS, WIDTHS))
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
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    for k in kinds:
        if k not in ("hidden", "gauss"):
            parser.error(f"unknown kind {k!r}; available: hidden, gauss")

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__} on {name}; input dtype {args.dtype}; "
          f"median of {repeats} after 1 warm-up")
    print("errors: max relative error of SR vs exact64 over the batch; fast passes: mean/max per item\n")
    shapes, skipped = plan(args, device)

    header = (f"{'B x T x d':>16} {'kind':>6} {'svdvals32':>10} {'exact64':>10} {'fast':>9} "
              f"{'speed-up':>9} {'err svd32':>10} {'err fast':>10} {'passes':>8}")
    print(header)
    print("-" * len(header))
    t_start = time.perf_counter()
    for (B, T, d), kind in itertools.product(shapes, kinds):
        label = f"{B} x {T} x {d}"
        try:
            h = make_batch(kind, B, T, d, device, seed=B + T + d).to(dtype)
            ms_exact, ref = timed(lambda: stable_rank_exact(h), device, repeats)
            ms_svd, sv = timed(lambda: torch.linalg.svdvals(h.float()), device, repeats)
            ms_fast, fast = timed(lambda: stable_rank(h), device, repeats)
        except (torch.OutOfMemoryError, MemoryError) as exc:
            print(f"{label:>16} {kind:>6}  skipped: out of memory ({type(exc).__name__})")
            continue
        hf = h.float()
        sr_svd = hf.square().sum(dim=(1, 2)) / sv[:, 0].square()
        it = fast.iterations.float()
        print(f"{label:>16} {kind:>6} {ms_svd:>10.1f} {ms_exact:>10.1f} {ms_fast:>9.1f} "
              f"{ms_svd / ms_fast:>8.1f}x {rel_err(sr_svd, ref.stable_rank):>10.1e} "
              f"{rel_err(fast.stable_rank, ref.stable_rank):>10.1e} "
              f"{it.mean().item():>4.0f}/{it.max().item():<3.0f}", flush=True)
        del h, hf, ref, sv, fast
    print(f"\nwall time {time.perf_counter() - t_start:.0f} s")
    for (B, T, d), why in skipped:
        print(f"skipped {B} x {T} x {d}: {why}")


if __name__ == "__main__":
    main()
