"""Third-party warnings that are not ours to fix, muted where we trigger them (and only those).

peft asks the model `is_gradient_checkpointing`, which transformers 5 deprecates: without this,
every rank of every run (and every export) prints that FutureWarning.

bitsandbytes, imported through peft, tries `from kernels import get_kernel` (the Hugging Face
Hub package of that name) on CPUs with AVX512-BF16 and logs a warning when that fails. Our
top-level package is also called `kernels` (tests/test_kernels_not_hub.py), so the warning
names our folder and asks the user to `pip install kernels`: wrong advice (the Hub package
would download a kernel at run time, which longtune never needs). Only that record is dropped.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        yield


class _NoHubKernelProbe(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in str(record.msg)


_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


def mute_bnb_hub_kernel_probe() -> None:
    """Drop bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" warning."""
    log = logging.getLogger(_BNB_CPU_LOGGER)
    if not any(isinstance(f, _NoHubKernelProbe) for f in log.filters):
        log.addFilter(_NoHubKernelProbe())
