"""Generate docs/recipes.md from the schema itself, so the reference cannot drift from the code.

Field documentation is the `#:` comment block right above each field in finetune/recipe.py.
`python -m finetune.recipe_docs` rewrites the file; a test fails when it is stale.
"""

from __future__ import annotations

import inspect
import re
import sys
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from finetune import recipe as R

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "recipes.md"

SECTIONS = [
    ("top level", R.Recipe),
    ("model", R.ModelSection),
    ("rope", R.RopeSection),
    ("attention", R.AttentionSection),
    ("hybrid", R.HybridSection),
    ("hybrid.full_layers (placement form)", R.FullLayersPlacement),
    ("hybrid.sparse", R.SparseSection),
    ("lora", R.LoraSection),
    ("data", R.DataSection),
    ("data.sources[]", R.SourceSection),
    ("data.sources[].synthetic", R.SyntheticRetrievalSection),
    ("training", R.TrainingSection),
    ("deepspeed", R.DeepSpeedSection),
    ("memory", R.MemorySection),
    ("export", R.ExportSection),
    ("export.kv_cache", R.KVCacheSection),
    ("eval", R.EvalSection),
]


def field_comments(cls: type[BaseModel]) -> dict[str, str]:
    lines = inspect.getsource(cls).splitlines()
    out: dict[str, str] = {}
    pending: list[str] = []
    for line in lines:
        s = line.strip()
        if s.startswith("#:"):
            pending.append(s[2:].strip())
            continue
        m = re.match(r"^([a-z_][a-z0-9_]*)\s*:", s)
        if m and m.group(1) in cls.model_fields:
            out[m.group(1)] = " ".join(pending)
        pending = [] if not s.startswith("#") else pending
    return out


def type_name(t) -> str:
    origin = typing.get_origin(t)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(t))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join(type_name(a) for a in typing.get_args(t))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in typing.get_args(t))}]"
    if t is type(None):
        return "null"
    if isinstance(t, type) and issubclass(t, BaseModel):
        return "section"
    return getattr(t, "__name__", str(t))


def default_text(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(section defaults)"
    if isinstance(value, float):
        return f"`{value:.6g}`"
    return f"`{value!r}`".replace("None", "null").replace("True", "true").replace("False", "false")


def render() -> str:
    out = [
        "# Recipe reference",
        "",
        "Generated from `finetune/recipe.py` by `python -m finetune.recipe_docs`; do not edit by hand.",
        "",
        "A recipe is a YAML mapping of the sections below. `base: other.yaml` extends another recipe",
        "(deep merge; paths relative to the extending file, then `recipes/`). Any key can be",
        "overridden on the command line: `make train RECIPE=r.yaml ARGS=\"training.max_steps=10",
        "attention.pattern=sf_attn\"` (values are parsed as YAML). Unknown keys are errors with a",
        "did-you-mean; wrong types name the key and the expected type; YAML syntax errors name",
        "the file and line. The resolved recipe is written to `<run_dir>/recipe.yaml`.",
        "",
    ]
    for title, cls in SECTIONS:
        doc = inspect.getdoc(cls) or ""
        if cls.__doc__ is None or doc.startswith(("Base class", "Usage docs")):
            doc = ""
        out += [f"## `{title}`", ""]
        if doc:
            out += [doc, ""]
        out += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        comments = field_comments(cls)
        for name, f in cls.model_fields.items():
            out.append(f"| `{name}` | {type_name(f.annotation)} | {default_text(f)} | {comments.get(name, '')} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    DOC_PATH.write_text(render())
    print(f"wrote {DOC_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
