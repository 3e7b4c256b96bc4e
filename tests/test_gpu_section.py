"""The GPU section writer (finetune/gpu_section.py) on a folder shaped like scripts/gpu_check.sh's
$OUT: ratios next to their targets, misses called misses, a part that did not run reported as not
measured, and only the bench:gpu section of the document rewritten."""

from __future__ import annotations

import json

from finetune.gpu_section import main, section


def _folder(tmp_path, with_kv=True, name="out"):
    d = tmp_path / name
    d.mkdir()
    (d / "env.txt").write_text("date: 2026-11-30 10:00 UTC\nmode: full\ngpu: NVIDIA H200, 143771 MiB, 580.1\n"
                               "cpus: 16\npython: 3.12.3\ntorch: 2.11.0+cu130\ntriton: 3.6.0\n"
                               "transformers: 5.24.0\npeft: 0.21.2\nflash_attn: absent (ModuleNotFoundError)\n"
                               "cuda: True 13.0 NVIDIA H200\n")  # fmt: skip
    (d / "status.txt").write_text("tests 0 61\nattention 0 98\ntrain_step 124 140\nkv 1 30\n")
    (d / "gpu_tests.txt").write_text(
        "tests/test_gpu.py::test_a PASSED [ 50%]\ntests/test_gpu.py::test_b FAILED [100%]\n"
        "FAILED tests/test_gpu.py::test_b - AssertionError\n========= 1 failed, 1 passed, 18 skipped in 61.0s =========\n"
    )
    rows = [
        {"n": 32768, "label": "full causal", "pattern": "causal", "backend": "sdpa", "fraction": 1.0, "ms": 100.0,
         "mib": 10, "speedup": 1.0},
        {"n": 32768, "label": "SF", "pattern": "sf_attn", "backend": "flex", "fraction": 0.25, "ms": 40.0,
         "mib": 10, "speedup": 2.5},
        {"n": 32768, "label": "SF", "pattern": "sf_attn", "backend": "sdpa_groups", "fraction": 0.25, "ms": 25.0,
         "mib": 10, "speedup": 4.0},
        {"n": 8192, "label": "block", "pattern": "block_sparse", "backend": "flex", "error": "OutOfMemoryError: x"},
    ]  # fmt: skip
    (d / "attention.json").write_text(json.dumps({"heads": 32, "head_dim": 128, "dtype": "bf16", "rows": rows}))
    ts = [{"variant": "causal", "length": 16384, "seconds": 3.0, "peak_gib": 20.0, "kernels": {"causal/sdpa": 22}},
          {"variant": "sf_attn", "length": 16384, "seconds": 2.0, "peak_gib": 19.0, "kernels": {"sf_attn/flex": 22}},
          {"variant": "causal", "length": 32768, "seconds": 9.0, "peak_gib": 30.0, "kernels": {}},
          {"variant": "sf_attn", "length": 32768, "error": "not measured (timeout 75s): "}]  # fmt: skip
    (d / "train_step.json").write_text(json.dumps({"model": "m", "config": {
        "num_hidden_layers": 22, "hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 4,
        "vocab_size": 32000}, "rows": ts}))  # fmt: skip
    if with_kv:
        kv = [{"method": m, "T": t, "batch": 1, "nbytes": 2**20, "fraction": 1.0, "prefill_tokens_per_s": 1.0,
               "prefill_x": px, "peak_prefill_bytes": None, "memory_x": None, "decode_tokens_per_s": 1.0,
               "decode_x": dx} for m, t, px, dx in [("full", 32800, 1.0, 1.0), ("hybrid", 32800, 1.8, 1.2),
                                                    ("hybrid", 65568, 2.0, 1.5)]]  # fmt: skip
        (d / "kv.json").write_text(json.dumps({"model": "Random Llama", "decode": 32, "rows": kv}))
    return d


def test_targets_met_and_missed(tmp_path):
    text = section(_folder(tmp_path))
    lines = text.splitlines()
    row = lambda start: next(line for line in lines if line.startswith(start))
    # the best SF backend counts, the other is shown beside it
    assert row("| SF-Attn fwd+bwd") == ("| SF-Attn fwd+bwd vs full causal SDPA at 32k | >= 3.5x | "
                                        "4.00x (sdpa_groups; flex 2.50x) | met |")  # fmt: skip
    assert row("| hybrid prefill").endswith("| 1.80x at 32800 (batch 1), 2.00x at 65568 (batch 1) | met |")
    # decode: 1.2 < 1.41 at 32k, 1.5 at 64k: a miss, with the length that met it visible
    assert row("| hybrid decode").endswith("| 1.20x at 32800 (batch 1), 1.50x at 65568 (batch 1) | **missed** (some met) |")
    # training: 3.0 / 2.0 = 1.5x at 16k (met); 32k not measured is not counted as met
    assert row("| training step") == "| training step, SF-Attn vs full attention, 16k+ (`sf_attn`) | >= 1.5x | 1.50x at 16384 | met |"
    assert "| 32768 | sf_attn | failed: not measured (timeout 75s):" in text
    assert "| 16384 | sf_attn | 2.00 | 1.50x | 19.00 | sf_attn/flex 22 |" in text
    assert "| 8192 | block | flex | | failed: OutOfMemoryError: x |" in text
    # attention rows sorted by length (32k is measured first on the GPU)
    assert text.index("| 8192 | block |") < text.index("| 32768 | full causal")
    assert "1 failed, 1 passed, 18 skipped in 61.0s. Failed: tests/test_gpu.py::test_b." in text
    assert "train_step timed out after 140 s" in text and "kv exit 1, 30 s" in text
    assert "NVIDIA H200, 143771 MiB" in text and "no wheel exists for this torch" in text
    assert "Smoke run" not in text


def test_missing_part_is_not_measured_and_other_sections_stay(tmp_path):
    d = _folder(tmp_path, with_kv=False)
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n<!-- bench:kv -->\nold kv\n<!-- /bench:kv -->\n\n<!-- bench:gpu -->\nold\n<!-- /bench:gpu -->\n")
    assert main([str(d), "--output", str(doc)]) == 0
    text = doc.read_text()
    assert "old kv" in text and "\nold\n" not in text
    assert "| hybrid prefill tokens/s vs full, 32k+ | >= 1.67x | not measured | **not measured** |" in text
    assert "Not measured (no kv.json)." in text
    assert text.count("<!-- bench:gpu -->") == 1
    assert main([str(tmp_path / "nope"), "--output", str(doc)]) == 2


def test_a_rerun_folder_replaces_its_parts(tmp_path):
    first = _folder(tmp_path, with_kv=False)
    rerun = tmp_path / "rerun"
    rerun.mkdir()
    (rerun / "status.txt").write_text("kv 0 40\n")
    kv = [{"method": "full", "T": 32800, "batch": 1, "nbytes": 2**20, "fraction": 1.0, "prefill_tokens_per_s": 1.0,
           "prefill_x": 1.0, "decode_tokens_per_s": 1.0, "decode_x": 1.0},
          {"method": "hybrid", "T": 32800, "batch": 1, "nbytes": 2**19, "fraction": 0.5, "prefill_tokens_per_s": 1.0,
           "prefill_x": 1.5, "decode_tokens_per_s": 1.0, "decode_x": 1.5}]  # fmt: skip
    (rerun / "kv.json").write_text(json.dumps({"model": "Random Llama", "decode": 32, "rows": kv}))
    text = section([first, rerun])
    assert "| hybrid prefill tokens/s vs full, 32k+ | >= 1.67x | 1.50x at 32800 (batch 1) | **missed** |" in text
    assert "| hybrid decode tokens/s vs full, 32k+ | >= 1.41x | 1.50x at 32800 (batch 1) | met |" in text
    assert "kv exit 0, 40 s" in text and "kv exit 1" not in text and "tests exit 0, 61 s" in text
    assert "4.00x (sdpa_groups" in text  # the first run's attention rows stay
