"""benchmarks/default_selector.py on two synthetic reports: the worst case per selector against
random@n, the winner by the best worst case (ties by the next-worst case), the code reading."""

from __future__ import annotations

import json

from benchmarks import default_selector as ds


def _report(path, task, accs, n=(1, 8)):
    row = {s: {"accuracy": a, "vs_random": {"points_ci95": [-1.0, 1.0]}} for s, a in accs.items()}
    path.mkdir(parents=True)
    (path / f"{task}.json").write_text(json.dumps({"task": task, "n": list(n), "problems": 10, "selectors": list(row),
                                                   "config": {"model": "m"},
                                                   "results": {str(k): row for k in n}}))


def test_best_worst_case_and_the_code_reading(tmp_path):
    _report(tmp_path / "a", "gsm8k", {"random": 0.2, "majority": 0.5, "auto": 0.5, "sr-response": 0.1,
                                      "mbr-lexical": 0.25, "oracle": 0.9})
    _report(tmp_path / "b", "mbpp", {"random": 0.3, "majority": 0.3, "auto": 0.3, "sr-response": 0.4,
                                     "mbr-lexical": 0.32, "oracle": 0.5, "exec": 0.45, "exec-sr": 0.44})
    reps = ds.reports(tmp_path)
    assert [r["kind"] for r in reps] == ["math", "code"] and all(r["n"] == 8 for r in reps)
    plain = ds.table(reps, python_answers=False)
    assert plain["rows"]["sr-response"]["worst"] == -10.0 and plain["winner"] == "mbr-lexical"
    code = ds.table(reps, python_answers=True)
    assert round(code["rows"]["majority"]["worst"], 6) == 15.0 and code["winner"] == "auto"  # auto = majority: no answers needed
    assert code["tied"] == ["auto", "majority"]
    assert "Best worst case" in ds.markdown(reps, {"t": plain})
