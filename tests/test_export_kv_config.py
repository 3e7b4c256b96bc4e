"""kv_cache_config.json: built from export.kv_cache, validated against the model at export."""

from __future__ import annotations

import json

import pytest

from finetune.caches import config as kv_config
from finetune.caches.config import KVConfigError
from finetune.export import export_run

CAUSAL = {"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
          "longtune_attention": {"version": 1, "layers": [{"pattern": "causal"}] * 4}}  # fmt: skip
SW = {"pattern": "sink_window", "window": 16, "num_sink_tokens": 2}
HYBRID = {
    **CAUSAL,
    "longtune_attention": {"version": 1, "layers": [SW, {"pattern": "causal"}, {"pattern": "causal"}, SW]},
}


def test_schema_and_defaults():
    cfg = kv_config.build({"method": "h2o"}, CAUSAL)
    assert cfg["version"] == 2 and cfg["method"] == "h2o"
    assert cfg["heavy_ratio"] == 0.1 and cfg["recent_ratio"] == 0.1  # reference 10% + 10%
    assert cfg["heavy"] is None and cfg["num_sink_tokens"] == 4
    assert cfg["score_normalization"] == "none" and cfg["gqa_reduction"] == "mean"
    assert cfg["layers"] == "all" and cfg["full_layers"] is None
    assert cfg["attn_implementation"] == "longtune"
    assert kv_config.build({"method": "full"}, CAUSAL)["attn_implementation"] is None


def test_hybrid_method_takes_the_layout():
    cfg = kv_config.build({"method": "hybrid"}, HYBRID)
    assert cfg["full_layers"] == [1, 2] and cfg["layers"] == "sparse"
    assert cfg["window"] == 16 and cfg["num_sink_tokens"] == 2
    assert cfg["attn_implementation"] == "longtune"
    # Even the full cache of a hybrid model needs longtune's attention for its sparse layers.
    assert kv_config.build({"method": "full"}, HYBRID)["attn_implementation"] == "longtune"


@pytest.mark.parametrize(
    "kv, model, key",
    [
        ({"method": "hybrid"}, CAUSAL, "export.kv_cache.method"),
        ({"method": "sink"}, CAUSAL, "export.kv_cache.window"),
        ({"method": "h2o", "layers": [0, 9]}, CAUSAL, "export.kv_cache.layers"),
        ({"method": "h2o", "layers": "sparse"}, CAUSAL, "export.kv_cache.layers"),
        ({"method": "h2o", "heavy": 64, "heavy_ratio": 0.2}, CAUSAL, "export.kv_cache.heavy"),
        ({"method": "h2o", "heavy_ratio": 1.5}, CAUSAL, "export.kv_cache.heavy_ratio"),
        ({"method": "lru"}, CAUSAL, "export.kv_cache.method"),
        ({"method": "h2o", "budget": 3}, CAUSAL, "export.kv_cache.budget"),
        ({"method": "hybrid", "window": 99}, HYBRID, "export.kv_cache.window"),
    ],
)
def test_errors_name_the_key(kv, model, key):
    with pytest.raises(KVConfigError, match=key.replace(".", r"\.")):
        kv_config.build(kv, model)


def test_read_checks_version(tmp_path):
    assert kv_config.read(tmp_path) is None
    (tmp_path / kv_config.FILE).write_text(json.dumps({"version": 3, "method": "full"}))
    with pytest.raises(KVConfigError, match="version"):
        kv_config.read(tmp_path)


def test_version_1_files_read_as_absolute_positions(tmp_path):
    """Version 2 added `positions`; a version 1 file means the sink cache's absolute positions."""
    (tmp_path / kv_config.FILE).write_text(json.dumps({"version": 1, "method": "sink", "window": 8}))
    cfg = kv_config.validate(kv_config.read(tmp_path), CAUSAL, where="kv_cache_config.json")
    assert cfg["version"] == 2 and cfg["positions"] == "absolute"
    with pytest.raises(KVConfigError, match=r"kv_cache\.positions: not part of version 1"):
        kv_config.validate({"version": 1, "method": "sink", "window": 8, "positions": "cache"})


def test_one_validator_one_error():
    """#11: the caches package owns the KV-cache config; export and loading use it."""
    from finetune import caches

    assert caches.validate_kv_config is kv_config.validate and caches.KVConfigError is KVConfigError
    with pytest.raises(ImportError):
        import finetune.export.kv_config  # noqa: F401


@pytest.mark.parametrize("text,msg", [("[1, 2]", "expected a JSON object, got list"),
                                      ('"full"', "expected a JSON object, got str"),
                                      ('{"version": 1,\n  "method": }', ":2: invalid JSON")])  # fmt: skip
def test_read_names_the_file_for_malformed_json(tmp_path, text, msg):
    (tmp_path / kv_config.FILE).write_text(text)
    with pytest.raises(KVConfigError) as e:
        kv_config.read(tmp_path)
    assert str(tmp_path / kv_config.FILE) in str(e.value) and msg in str(e.value)


def test_export_refuses_invalid_kv_config_before_writing(sf_run, tmp_path):
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(sf_run, run)
    r = yaml.safe_load((run / "recipe.yaml").read_text())
    r["export"]["kv_cache"] = {"method": "hybrid"}  # an SF-Attn model is not hybrid
    (run / "recipe.yaml").write_text(yaml.safe_dump(r))
    with pytest.raises(KVConfigError, match=r"export\.kv_cache\.method: 'hybrid' needs a LongGen hybrid"):
        export_run(run, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_exported_kv_config_file(sf_run, tmp_path):
    out = export_run(sf_run, tmp_path / "e", dtype="float32")
    cfg = json.loads((out / "kv_cache_config.json").read_text())
    assert cfg["version"] == 2 and cfg["positions"] == "absolute" and cfg["method"] == "sink" and cfg["window"] == 8
    assert cfg["num_layers"] == 2 and cfg["attn_implementation"] == "longtune"
    from finetune.caches import validate_kv_config

    assert validate_kv_config(cfg, json.loads((out / "config.json").read_text()))["window"] == 8
