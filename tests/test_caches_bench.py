"""`longtune bench kv` from the CLI: exits 0 and its bytes follow the formula (tiny model, no write)."""

from __future__ import annotations

from finetune import cli
from finetune.caches import bench

TINY = ["--lengths", "40", "--layers", "3", "--hidden", "32", "--heads", "2", "--kv-heads", "1",
        "--window", "8", "--sinks", "2", "--decode", "1", "--batch", "1", "--threads", "1", "--no-write"]  # fmt: skip


def test_cli_bench_kv_exits_zero(capsys):
    assert cli.main(["bench", "kv", *TINY]) == 0
    assert "| method | T |" in capsys.readouterr().out


def test_rows_bytes_follow_the_formula():
    rows = {r["method"]: r for r in bench.run(TINY)}
    # 3 layers, full fraction 1/3 -> 1 full layer; hybrid keeps F/L + (L-F)/L (W+s)/T of full
    T = rows["full"]["T"]
    assert T == 41
    assert abs(rows["hybrid"]["fraction"] - (1 / 3 + 2 / 3 * (8 + 2) / T)) < 1e-9
    assert abs(rows["sink"]["fraction"] - (8 + 2) / T) < 1e-9


def test_bench_model_dir_ratios_and_section(tmp_path):
    """--model takes a model directory; rows carry tokens/s and memory ratios to full; the KV
    section is rewritten and the attention section left as it was."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=128)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "model")
    md = tmp_path / "benchmarks.md"
    attention = "<!-- bench:attention -->\nkernel table\n<!-- /bench:attention -->\n"
    md.write_text("# Benchmarks\n\n<!-- bench:kv -->\nold\n<!-- /bench:kv -->\n\n" + attention)
    rows = bench.run(["--model", str(tmp_path / "model"), "--lengths", "24", "--batch", "1", "2", "--window", "6",
                      "--sinks", "2", "--decode", "1", "--threads", "1", "--output", str(md)])  # fmt: skip
    assert {r["method"] for r in rows} == {"full", "hybrid", "sink", "h2o"}  # hybrid: the synthetic layout
    assert {r["batch"] for r in rows} == {1, 2}
    for r in rows:
        full = next(f for f in rows if f["method"] == "full" and f["batch"] == r["batch"])
        assert r["prefill_x"] == r["prefill_tokens_per_s"] / full["prefill_tokens_per_s"]
        assert r["decode_x"] == r["decode_tokens_per_s"] / full["decode_tokens_per_s"]
        assert r["fraction"] == r["nbytes"] / full["nbytes"]
    text = md.read_text()
    assert attention in text and "old" not in text and "| decode tok/s | x full |" in text


def test_max_tokens_skips_the_large_pairs():
    i = TINY.index("--batch")
    argv = TINY[:i] + TINY[i + 2:] + ["--batch", "1", "2", "--max-tokens", "40"]
    rows = bench.run(argv)
    assert {r["batch"] for r in rows} == {1}  # batch 2 x 40 tokens > 40: not measured


def test_rows_file_merges_pieces(tmp_path, capsys):
    """--rows: pieces (here: one method each) add up to one table; ratios use the full row of
    another piece; a piece of other settings is refused (exit 2) and the file left alone."""
    import json

    import pytest

    md, rows_file = tmp_path / "benchmarks.md", tmp_path / "rows.json"
    md.write_text("<!-- bench:kv -->\nold\n<!-- /bench:kv -->\n")
    base = [a for a in TINY if a != "--no-write"] + ["--output", str(md), "--rows", str(rows_file)]
    bench.run(base + ["--methods", "full"])
    merged = bench.run(base + ["--methods", "sink", "h2o"])
    assert [r["method"] for r in merged] == ["full", "sink", "h2o"]
    full = merged[0]
    for r in merged:
        assert r["decode_x"] == r["decode_tokens_per_s"] / full["decode_tokens_per_s"]
        assert r["fraction"] == r["nbytes"] / full["nbytes"]
    text = md.read_text()
    assert "Commands (one piece each" in text and "--methods full" in text and "--methods sink h2o" in text
    assert text.count("| sink |") == 1 and "Not measured" not in text
    i = base.index("--batch")
    bench.run(base[:i] + base[i + 2:] + ["--batch", "2", "--methods", "full"])
    assert "Not measured: sink at 40 batch 2, h2o at 40 batch 2." in md.read_text()
    bench.run(base + ["--lengths", "40", "48", "--max-tokens", "40", "--methods", "full",
                      "--note", "One busy piece."])  # 48: skipped  # fmt: skip
    text = md.read_text()
    assert "One busy piece." in text
    assert "Not measured: batch 1 at 48, sink at 40 batch 2, h2o at 40 batch 2." in text
    assert text.count("--max-tokens 40") == 1  # measured full at 40 batch 1 again: its command is listed
    before = rows_file.read_text()
    with pytest.raises(SystemExit) as e:
        bench.run(base + ["--methods", "full", "--window", "6"])
    assert e.value.code == 2 and "window" in capsys.readouterr().err
    assert rows_file.read_text() == before and len(json.loads(before)["rows"]) == 4


def test_methods_without_full_need_a_rows_file(capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        bench.run(TINY + ["--methods", "sink"])
    assert e.value.code == 2 and "--rows" in capsys.readouterr().err


def test_other_load_is_the_machine_busy_time_minus_ours(tmp_path, monkeypatch):
    """OtherLoad: CPUs kept busy by other processes = the machine's busy ticks (/proc/stat)
    minus this process's CPU time, over the wall time; None when /proc/stat is unreadable."""
    import os

    from finetune.caches import measure

    stat = tmp_path / "stat"
    monkeypatch.setattr(measure, "_STAT", stat)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    clock = {"cpu": 10.0, "wall": 50.0}
    monkeypatch.setattr(measure.time, "process_time", lambda: clock["cpu"])
    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock["wall"])
    # fields: user nice system idle iowait irq softirq steal
    stat.write_text("cpu  1000 0 0 1000 0 0 0 0\ncpu0 ...\n")
    with measure.OtherLoad() as load:
        # 2 s of wall on 2 CPUs = 400 ticks: 300 busy (user 100 + nice 150 + system 50), 100 idle;
        # we used 1 CPU-second of the 3 the machine spent busy: others kept 1.0 CPU busy
        stat.write_text("cpu  1100 150 50 1100 0 0 0 0\n")
        clock["cpu"], clock["wall"] = 11.0, 52.0
    assert abs(load.cpus - 1.0) < 1e-9
    stat.unlink()
    with measure.OtherLoad() as load:
        pass
    assert load.cpus is None
    rows = [{"others_cpus": 0.2}, {"others_cpus": 1.4}, {"others_cpus": None}]
    assert "kept 0.2-1.4 of the machine's 2 CPUs busy" in bench._load_sentence(rows, "cpu")
    assert "compare ratios measured under similar load" in bench._load_sentence(rows, "cpu")
    assert bench._load_sentence([{"others_cpus": None}], "cpu") == ""
