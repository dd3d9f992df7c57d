"""What running candidates in the sandbox costs next to sampling them (issue 32, part 4).

Times ``bon_sr.sandbox.run_programs`` on one prompt's batch: 16 typical small programs (MBPP-
sized functions: strings, lists, arithmetic, a few importing re, math, heapq or collections),
each with 3 ``assert`` examples, run in parallel (twice the cores, run_programs' default). Every program is a fresh
sandboxed process, so the start-up per process is most of the cost. Prints, over ``--repeats``
batches after a warm-up:

  batch      the median wall seconds of the whole batch (what a request waits for)
  program    the median wall seconds of one program inside its batch, and its CPU seconds
             (the whole tree: interpreter start-up, namespaces, the program)
  plain      the same batch as plain ``python -S -c`` subprocesses, no sandbox, same
             parallelism: what the containment adds
  timeouts   programs that hit a limit (none expected here: a timeout costs its wall limit and
             is reported apart, as in the product)

and the batch's median as a share of sampling the 16 candidates: measured with ``--sample``
(the default model, ``--max-new-tokens`` tokens each, one code prompt, the median of
``--sample-repeats`` runs after a warm-up), else the ``--sampling-s`` you pass (default 15 s,
the low end of 16 x 256 tokens with the 135M default model on a 2-core CPU machine).
The goal: under 5%.

    python benchmarks/sandbox_cost.py
    python benchmarks/sandbox_cost.py --sample            # + measured sampling (loads the model)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bon_sr.sandbox import Example, Limits, Program, check_sandbox, run_programs

#: (source, three assert lines): MBPP-like solutions, as a model writes them
PROGRAMS = [
    ("def reverse_words(s):\n    return ' '.join(reversed(s.split()))\n",
     ["reverse_words('python program') == 'program python'", "reverse_words('a b c') == 'c b a'",
      "reverse_words('one') == 'one'"]),
    ("def is_prime(n):\n    if n < 2:\n        return False\n    i = 2\n    while i * i <= n:\n"
     "        if n % i == 0:\n            return False\n        i += 1\n    return True\n",
     ["is_prime(13) == True", "is_prime(10) == False", "is_prime(7919) == True"]),
    ("import re\ndef text_match(text):\n    return 'Found a match!' if re.search(r'ab+', text) else 'Not matched!'\n",
     ["text_match('ac') == 'Not matched!'", "text_match('dc') == 'Not matched!'",
      "text_match('abba') == 'Found a match!'"]),
    ("import heapq\ndef heap_smallest(nums, n):\n    return heapq.nsmallest(n, nums)\n",
     ["heap_smallest([25, 35, 22, 85, 14, 65, 75, 22, 58], 3) == [14, 22, 22]",
      "heap_smallest([25, 35, 22, 85, 14, 65, 75, 22, 58], 2) == [14, 22]",
      "heap_smallest([1], 1) == [1]"]),
    ("def max_sub_array_sum(a, size):\n    best = cur = a[0]\n    for x in a[1:size]:\n"
     "        cur = max(x, cur + x)\n        best = max(best, cur)\n    return best\n",
     ["max_sub_array_sum([-2, -3, 4, -1, -2, 1, 5, -3], 8) == 7",
      "max_sub_array_sum([-3, -4, 5, -2, -3, 2, 6, -4], 8) == 8", "max_sub_array_sum([1], 1) == 1"]),
    ("import math\ndef volume_cone(r, h):\n    return math.pi * r * r * h / 3\n",
     ["round(volume_cone(5, 12), 2) == 314.16", "round(volume_cone(10, 15), 2) == 1570.8",
      "round(volume_cone(19, 17), 2) == 6426.65"]),
    ("from collections import Counter\ndef most_common(text, n):\n    return Counter(text).most_common(n)\n",
     ["most_common('lkseropewdssafsdfafkpwe', 3) == [('s', 4), ('e', 3), ('f', 3)]",
      "len(most_common('aab', 1)) == 1", "most_common('', 2) == []"]),
    ("def remove_odd(lst):\n    return [x for x in lst if x % 2 == 0]\n",
     ["remove_odd([1, 2, 3]) == [2]", "remove_odd([2, 4, 6]) == [2, 4, 6]", "remove_odd([10, 20, 3]) == [10, 20]"]),
    ("def count_vowels(s):\n    return sum(1 for c in s.lower() if c in 'aeiou')\n",
     ["count_vowels('corner') == 2", "count_vowels('valid') == 2", "count_vowels('true') == 2"]),
    ("def tuple_to_int(t):\n    return int(''.join(map(str, t)))\n",
     ["tuple_to_int((1, 2, 3)) == 123", "tuple_to_int((4, 5, 6)) == 456", "tuple_to_int((5, 6, 7)) == 567"]),
    ("def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
     ["fib(10) == 55", "fib(1) == 1", "fib(30) == 832040"]),
    ("def common_elements(a, b):\n    return sorted(set(a) & set(b))\n",
     ["common_elements([1, 2, 3], [2, 3, 4]) == [2, 3]", "common_elements([], [1]) == []",
      "common_elements('abc', 'bcd') == ['b', 'c']"]),
    ("def find_char_long(text):\n    return [w for w in text.split() if len(w) >= 4]\n",
     ["find_char_long('Please move back to stream') == ['Please', 'move', 'back', 'stream']",
      "find_char_long('Jing Eco and Tech') == ['Jing', 'Tech']", "find_char_long('a bb') == []"]),
    ("def square_nums(nums):\n    return list(map(lambda x: x ** 2, nums))\n",
     ["square_nums([1, 2, 3]) == [1, 4, 9]", "square_nums([10, 20]) == [100, 400]", "square_nums([]) == []"]),
    ("def binary_to_decimal(b):\n    result = 0\n    for digit in str(b):\n        result = result * 2 + int(digit)\n"
     "    return result\n",
     ["binary_to_decimal(100) == 4", "binary_to_decimal(1011) == 11", "binary_to_decimal(1101101) == 109"]),
    ("def dict_depth(d):\n    if not isinstance(d, dict) or not d:\n        return 1 if isinstance(d, dict) else 0\n"
     "    return 1 + max(dict_depth(v) for v in d.values())\n",
     ["dict_depth({'a': 1, 'b': {'c': {'d': {}}}}) == 4", "dict_depth({'a': 1, 'b': {'c': 'python'}}) == 2",
      "dict_depth({1: 'Sun', 2: {3: {4: 'Mon'}}}) == 3"]),
]
CODE_PROMPT = "Write a Python function to find the shared elements from the given two lists.\n" \
              "assert set(similar_elements((3, 4, 5, 6), (5, 7, 4, 10))) == set((4, 5))"


def batch() -> list[Program]:
    return [Program(src, tuple(Example(stmt=f"assert {a}") for a in asserts)) for src, asserts in PROGRAMS]


def plain_batch_seconds(programs: list[Program], workers: int) -> float:
    """The same batch as plain subprocesses: no namespaces, no limits, no result protocol."""
    exe = os.path.realpath(sys.executable)

    def one(p: Program) -> None:
        code = p.source + "\n" + "\n".join(e.stmt for e in p.examples)
        subprocess.run([exe, "-S", "-s", "-B", "-c", code], check=True, stdin=subprocess.DEVNULL,
                       env={"PYTHONHASHSEED": "0"})

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, programs))
    return time.perf_counter() - t0


def sampling_seconds(n: int, max_new_tokens: int, repeats: int) -> tuple[float, str]:
    """Median wall seconds of sampling ``n`` candidates for one code prompt, and the backend."""
    from bon_sr import BestOfN

    with BestOfN(n=n, max_new_tokens=max_new_tokens, selector="first", seed=0) as bon:
        bon.select("Say hi.", seed=99)  # warm-up: engine, first batch
        times = []
        for k in range(repeats):
            t0 = time.perf_counter()
            bon.select(CODE_PROMPT, seed=k)
            times.append(time.perf_counter() - t0)
        return statistics.median(times), bon.backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10, help="timed batches (median)")
    parser.add_argument("--workers", type=int, default=None,
                        help="parallel programs (default: run_programs' own, twice the cores)")
    parser.add_argument("--sample", action="store_true", help="measure sampling 16 candidates (loads the model)")
    parser.add_argument("--sampling-s", type=float, default=15.0, help="sampling seconds to compare with, "
                        "without --sample")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--sample-repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    args = parser.parse_args()

    check_sandbox()
    programs = batch()
    workers = args.workers or 2 * len(os.sched_getaffinity(0))
    limits = Limits()
    warm = run_programs(programs, limits=limits, max_workers=workers)
    failed = [i for i, r in enumerate(warm) if not r.passed]
    if failed:
        raise SystemExit(f"programs {failed} do not pass their examples: {[warm[i].to_dict() for i in failed]}")
    batch_s, program_s, cpu_s, timeouts = [], [], [], 0
    for _ in range(args.repeats):
        c0 = os.times()
        t0 = time.perf_counter()
        results = run_programs(programs, limits=limits, max_workers=workers)
        batch_s.append(time.perf_counter() - t0)
        c1 = os.times()
        cpu_s.append((c1.children_user + c1.children_system - c0.children_user - c0.children_system) / len(programs))
        program_s += [r.wall_s for r in results]
        timeouts += sum(r.status == "timeout" for r in results)
    plain_s = [plain_batch_seconds(programs, workers) for _ in range(args.repeats)]

    sampling, source = args.sampling_s, "given with --sampling-s"
    if args.sample:
        sampling, backend = sampling_seconds(len(programs), args.max_new_tokens, args.sample_repeats)
        source = f"measured: default model, {backend} backend, median of {args.sample_repeats}"
    med = statistics.median(batch_s)
    rows = {"programs": len(programs), "examples_each": 3, "workers": workers, "repeats": args.repeats,
            "batch_s_median": med, "batch_s_min": min(batch_s), "batch_s_max": max(batch_s),
            "program_wall_s_median": statistics.median(program_s), "program_cpu_s_median": statistics.median(cpu_s),
            "plain_batch_s_median": statistics.median(plain_s), "timeouts": timeouts,
            "sampling_s": sampling, "pct_of_sampling": 100 * med / sampling}
    print(f"# {platform.machine()}, {os.cpu_count()} cores ({workers} workers), Linux {platform.release()}, "
          f"Python {platform.python_version()}; {len(programs)} programs x 3 asserts, {args.repeats} batches")
    print(f"batch (sandboxed)    median {med:.3f} s   (min {min(batch_s):.3f}, max {max(batch_s):.3f})")
    print(f"program in a batch   median {rows['program_wall_s_median']:.3f} s wall, "
          f"{rows['program_cpu_s_median'] * 1e3:.1f} ms CPU (the process tree)")
    print(f"batch (plain python) median {rows['plain_batch_s_median']:.3f} s   (no sandbox: what containment adds "
          f"is {med - rows['plain_batch_s_median']:+.3f} s)")
    print(f"timeouts             {timeouts} of {len(programs) * args.repeats} runs")
    print(f"sampling 16 x {args.max_new_tokens} tokens: {sampling:.2f} s ({source})")
    print(f"exec step = {rows['pct_of_sampling']:.2f}% of sampling (goal: under 5%)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
