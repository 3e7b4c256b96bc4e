"""docs/benchmarks.md is shared by every `longtune bench`: each bench owns one marked section
(`<!-- bench:NAME -->` ... `<!-- /bench:NAME -->`) and rewrites only that, so the attention,
KV-cache and long-sequence tables can be regenerated one at a time. One writer and one machine
line for all of them; it lives beside the attention bench because `kernels` imports nothing of
`finetune`, and the finetune benches may import kernels.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"


def write_section(block: str, name: str, path: Path = DOC) -> None:
    """Replace the section `name` (the block holds its own markers) or append it; temp file + rename."""
    start, end = markers(name)
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    new = replace_marked(old, start, end, block)
    write_file(path, new if new is not None else old.rstrip("\n") + "\n\n" + block + "\n")


def replace_marked(text: str, start: str, end: str, block: str) -> str | None:
    """`text` with everything from `start` to `end` replaced by `block` (which holds both
    markers); None when `text` has no such span. The generated sections of docs/benchmarks.md
    and the README's demo and ablation tables are all rewritten through this."""
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    return pattern.sub(lambda _: block, text) if pattern.search(text) else None


def write_file(path: Path, text: str) -> None:
    """Temp file + rename, so a run cut short leaves the old file or a whole new one. (The kernels
    layer sits below finetune/ and cannot use finetune.rundir's writer.)"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def cpu_name() -> str:
    """The processor's model name (Linux /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
