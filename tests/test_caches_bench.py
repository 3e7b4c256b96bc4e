"""`longtune bench kv` from the CLI: exits 0 and its bytes follow the formula (tiny model, no write)."""

from __future__ import annotations

from finetune import cli
from finetune.caches import bench

TINY = ["--lengths", "40", "--layers", "3", "--hidden", "32", "--heads", "2", "--kv-heads", "1",
        "--window", "8", "--sinks", "2", "--decode", "1", "--threads", "1", "--no-write"]  # fmt: skip


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
