"""Every figure is a non-empty PNG; nothing to draw gives no file."""

from finetune.eval import plots

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(p):
    data = p.read_bytes()
    return data.startswith(PNG) and len(data) > 1000


def test_figures(tmp_path):
    ppl = {
        "tuned": {
            "longlora": {"256": {"ppl": 9.1}, "512": {"ppl": 8.7}},
            "sliding": {"256": {"ppl": 9.0}, "512": None},
        },
        "base": {"longlora": {"256": {"ppl": 9.5}, "512": {"ppl": 40.0}}, "sliding": {"256": {"ppl": 9.4}}},
    }
    assert _is_png(plots.perplexity(ppl, tmp_path / "ppl.png"))
    pk = {
        "tuned": {"256": {"accuracy": 1.0}, "512": {"accuracy": 0.5}, "64": {"accuracy": None, "error": "x"}}
    }
    assert _is_png(plots.passkey(pk, tmp_path / "pk.png"))
    nd = {
        "tuned": {"lengths": [256, 512], "depths": [0.0, 0.5, 1.0], "accuracy": [[1, 0, 1], [None, 0.5, 1]]},
        "base": {"lengths": [256, 512], "depths": [0.0, 0.5, 1.0], "accuracy": [[0, 0, 0], [0, 0, 0]]},
    }
    assert _is_png(plots.needle(nd, tmp_path / "needle.png"))
    sk = {
        m: {"per_head": [[0.1, 0.5], [0.9, 0.2]], "share_above": 0.5, "threshold": 0.3}
        for m in ("tuned", "base")
    }
    assert _is_png(plots.sinks(sk, tmp_path / "sinks.png"))
    kv = {
        "methods": {
            "full": {"256": {"nbytes": 2**20, "decode_tokens_per_s": 10.0}},
            "sink": {"256": {"nbytes": 2**18, "decode_tokens_per_s": 12.0}, "512": {"error": "boom"}},
        }
    }
    assert _is_png(plots.kv_cache(kv, tmp_path / "kv.png"))


def test_nothing_to_draw(tmp_path):
    assert plots.perplexity({"m": {"longlora": {"256": None}}}, tmp_path / "a.png") is None
    assert plots.passkey({}, tmp_path / "b.png") is None
    assert plots.kv_cache({"methods": {"full": {"256": {"error": "x"}}}}, tmp_path / "c.png") is None
    assert not list(tmp_path.iterdir())
