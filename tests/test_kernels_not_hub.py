"""Our top-level ``kernels`` package must not pass for the Hugging Face Hub ``kernels`` package.

transformers 5.24 probes ``importlib.util.find_spec("kernels")`` and, when no distribution
metadata names it, imports it and reads ``__version__``; it uses Hub kernels only for a
version in [KERNELS_MIN_VERSION, KERNELS_MAX_VERSION). Our package has no ``__version__`` (and
no distribution called ``kernels``), so the probe must answer False and models must still run.
"""

from __future__ import annotations

import importlib.util
import pathlib

import torch

import kernels

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_our_package_is_the_one_found():
    spec = importlib.util.find_spec("kernels")
    assert spec is not None and pathlib.Path(spec.origin).resolve().is_relative_to(REPO)


def test_transformers_does_not_take_it_for_hub_kernels():
    from transformers.utils import import_utils

    import_utils.is_kernels_available.cache_clear()
    try:
        assert import_utils.is_kernels_available() is False
        _, version = import_utils._is_package_available("kernels", return_version=True)
        assert version == "N/A" or import_utils.version.parse(version) < import_utils.version.parse(
            import_utils.KERNELS_MIN_VERSION
        )
    finally:
        import_utils.is_kernels_available.cache_clear()
    assert not hasattr(kernels, "__version__")
    for hub_name in ("get_kernel", "kernelize", "LayerRepository", "use_kernel_forward_from_hub"):
        assert not hasattr(kernels, hub_name)


def test_importing_ours_is_cheap_and_does_not_import_transformers_pieces():
    """transformers may import our package while it is itself importing: keep __init__ empty."""
    import ast

    tree = ast.parse((REPO / "kernels" / "__init__.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def test_models_load_and_run_with_our_package_importable(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM
    from transformers.integrations import hub_kernels

    assert hub_kernels.is_kernels_available() is False
    tiny_llama().save_pretrained(tmp_path)
    for impl in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=impl)
        with torch.no_grad():
            assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 259)
