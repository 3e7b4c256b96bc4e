"""The tiny run directories of conftest.py (`make_run`, `sf_run`, `hybrid_run`) are what
`finetune.train` writes."""


def test_fixture_final_is_as_train_writes_it(sf_run):
    final = sf_run / "final"
    for f in ("adapter_config.json", "adapter_model.safetensors", "longtune_model.json", "base/config.json"):
        assert (final / f).is_file(), f
    assert (sf_run / "recipe.yaml").is_file()
