"""data_prep.sources: JSON Lines records are split on newlines only."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from data_prep import DataError
from data_prep.sources import load_jsonl

# JSON allows these unescaped inside strings; str.splitlines() treats them as line breaks.
ODD_BREAKS = ["\u2028", "\u2029", "\u0085"]


@pytest.mark.parametrize("brk", ODD_BREAKS)
def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path, brk):
    records = [{"text": f"one{brk}two"}, {"text": "plain"}, {"text": f"{brk}lead and trail{brk}"}]
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    got = list(load_jsonl(SimpleNamespace(path=str(f))))
    assert [rec for _, rec in got] == records
    assert [where for where, _ in got] == [f"{f}:1", f"{f}:2", f"{f}:3"]


def test_jsonl_error_line_number_counts_newlines_only(tmp_path):
    f = tmp_path / "d.jsonl"
    good = json.dumps({"text": "a\u2028b\u2029c"}, ensure_ascii=False)
    f.write_text(f"{good}\r\n\r\n{good}\n{{broken\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        list(load_jsonl(SimpleNamespace(path=str(f))))
    assert f"{f}:4: invalid JSON" in str(e.value)
