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


def test_bitsandbytes_hub_kernel_probe_warning_is_dropped_and_nothing_else():
    """bitsandbytes' CPU backend logs "Failed to load ... from kernels-community: cannot import name
    'get_kernel' from 'kernels' (<our folder>)" on AVX512-BF16 CPUs; finetune drops that record only."""
    import logging

    import finetune  # noqa: F401  (installs the filter)

    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    h = Keep()
    log.addHandler(h)
    try:
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "cannot import name")
        log.warning("another bitsandbytes warning")
    finally:
        log.removeHandler(h)
    assert seen == ["another bitsandbytes warning"]


def test_importing_bitsandbytes_after_finetune_prints_no_kernels_advice():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "import finetune, bitsandbytes, peft"], capture_output=True,
                       text=True, cwd=REPO, timeout=300, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "kernels-community" not in r.stderr and "pip install kernels" not in r.stderr
