"""`longtune bench long` bookkeeping (finetune/long_bench.py): rows kept per (length, variant)
across runs, the table drawn from them, and the memory cap that turns an out-of-memory step into
a row. No model is run here; the benchmark itself is `make bench`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from finetune import long_bench as lb

RUN_A = {"date": "2026-11-29 10:00 UTC", "machine": "cpu A", "command": "python -m finetune.long_bench --lengths 4096"}
RUN_B = {"date": "2026-11-29 11:00 UTC", "machine": "cpu B", "command": "python -m finetune.long_bench --lengths 8192"}


def row(length, variant, seconds, peak=1.0, **extra):
    return {"length": length, "variant": variant, "seconds": seconds, "peak_gib": peak, **extra}


def test_merge_keeps_other_lengths_and_replaces_same_rows():
    first = lb.merge({"runs": [], "rows": []}, RUN_A, [row(4096, "peer", 40.0), row(4096, "longtune", 20.0)])
    second = lb.merge(first, RUN_B, [row(8192, "peer", 90.0), row(4096, "longtune", 10.0)])
    got = {(r["length"], r["variant"]): (r["seconds"], second["runs"][r["run"]]["machine"]) for r in second["rows"]}
    assert got == {(4096, "peer"): (40.0, "cpu A"), (4096, "longtune"): (10.0, "cpu B"), (8192, "peer"): (90.0, "cpu B")}
    assert [(r["length"], r["variant"]) for r in second["rows"]] == [(4096, "longtune"), (4096, "peer"), (8192, "peer")]
    # a run no row refers to any more is dropped
    third = lb.merge(second, RUN_B, [row(4096, "peer", 41.0)])
    assert third["runs"] == [RUN_B]


def test_table_speedup_only_within_one_run_and_oom_rows():
    res = lb.merge({"runs": [], "rows": []}, RUN_A, [row(4096, "peer", 40.0), row(4096, "longtune", 20.0),
                                                      row(8192, "peer", 80.0)])
    res = lb.merge(res, RUN_B, [row(8192, "longtune+memory", 40.0, estimate_gib=1.5),
                                {"length": 32768, "variant": "peer", "error": lb.oom_text(22)}])
    text = lb.table(res)
    assert text.startswith(lb.START) and text.endswith(lb.END)
    lines = {tuple(c.strip() for c in ln.strip("|").split("|")[:2]): ln for ln in text.splitlines() if ln.startswith("| ")}
    assert "| 2.00x |" in lines[("4096", "longtune")]  # 40 / 20, same run
    assert "x |" not in lines[("8192", "longtune+memory")]  # the peer row is another run's
    assert "| 1.50 | 1.50 |" in lines[("8192", "longtune+memory")]
    assert "OOM (> 22 GiB)" in lines[("32768", "peer")]
    assert "- A: 2026-11-29 10:00 UTC, cpu A." in text and "- B: 2026-11-29 11:00 UTC, cpu B." in text


def _capped(nbytes: int, cap_gib: float) -> dict:
    code = ("import json, torch, finetune.long_bench as b\n"
            f"b.worker = lambda v, n, *_: {{'variant': v, 'length': n, 'sum': torch.ones({nbytes} // 4).sum().item()}}\n"
            f"print(json.dumps(b.capped_worker('peer', 7, {cap_gib})))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_memory_cap_turns_an_allocation_into_an_oom_row():
    assert _capped(64 << 20, 1.0)["sum"] == (64 << 20) // 4  # under the cap: the step runs
    assert _capped(3 << 30, 1.0) == {"variant": "peer", "length": 7, "error": "OOM (> 1 GiB)"}


def test_timeout_row_says_how_far_the_step_got(monkeypatch):
    real = subprocess.run
    script = "import json,time; print(json.dumps({'progress':'forward','seconds':1.5}), flush=True); time.sleep(60)"
    monkeypatch.setattr(lb.subprocess, "run", lambda cmd, **kw: real([sys.executable, "-c", script], **kw))
    assert lb.measure("peer", 8, 3) == {"variant": "peer", "length": 8, "error": "not finished in 3 s (forward took 2 s)"}


def test_a_corrupt_results_file_is_named(tmp_path):
    from finetune.long_bench import load_results

    bad = tmp_path / "benchmarks_long.json"
    bad.write_text("{broken")
    with pytest.raises(ValueError, match="benchmarks_long.json"):
        load_results(bad)


def test_repeats_alternate_and_keep_the_fastest(monkeypatch, capsys):
    calls = []
    times = {("longtune", 0): 30.0, ("peer", 0): 50.0, ("longtune", 1): 34.0, ("peer", 1): 41.0}

    def fake_measure(variant, length, *_):
        n = sum(1 for v, _l in calls if v == variant)
        calls.append((variant, length))
        if variant == "longtune+memory":  # out of memory: measured once, never repeated
            return {"variant": variant, "length": length, "error": lb.oom_text(20)}
        return {"variant": variant, "length": length, "seconds": times[(variant, n)], "peak_gib": 1.0 + n}

    monkeypatch.setattr(lb, "measure", fake_measure)
    assert lb.main(["--lengths", "4096", "--estimate-lengths", "--repeats", "2", "--no-write"]) == 0
    # round by round: every variant once, then again (the out-of-memory one not again)
    assert calls == [("longtune", 4096), ("longtune+memory", 4096), ("peer", 4096), ("longtune", 4096), ("peer", 4096)]
    lines = {tuple(c.strip() for c in ln.strip("|").split("|")[:2]): ln
             for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")}
    # fastest of each (30 and 41 s), the larger peak, the speed-up between the fastest
    assert lines[("4096", "longtune")].startswith("| 4096 | longtune | 30.0 | 2.00 | 1.37x |")
    assert lines[("4096", "peer")].startswith("| 4096 | peer | 41.0 | 2.00 |")
    assert "OOM (> 20 GiB)" in lines[("4096", "longtune+memory")]
    assert lb.fastest([{"variant": "peer", "length": 1, "seconds": 50.0, "peak_gib": 1.0},
                       {"variant": "peer", "length": 1, "seconds": 41.0, "peak_gib": 2.0}])["all_seconds"] == [50.0, 41.0]
    assert ", fastest of 2 alternating repeats, torch " in lb.run_info("x", None, "wall", 2)["machine"]
    assert "repeats" not in lb.run_info("x")["machine"]


def test_repeats_below_one_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        lb.main(["--repeats", "0", "--no-write"])
    assert e.value.code == 2 and "--repeats must be >= 1" in capsys.readouterr().err
