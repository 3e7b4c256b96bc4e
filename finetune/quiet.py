"""Third-party warnings that are not ours to fix, muted where we trigger them (and only those).

peft asks the model `is_gradient_checkpointing`, which transformers 5 deprecates: without this,
every rank of every run (and every export) prints that FutureWarning.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        yield
