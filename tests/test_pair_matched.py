"""Pair.matched: row i of the clean and the triggered list is one input without / with the trigger."""

from __future__ import annotations

import pytest

from projlens_mi.analyses import Pair
from projlens_mi.data import Record
from projlens_mi.errors import ProjLensError


def rec(i, triggered, prompt="USER: <image>\nwhich number ? ASSISTANT:", answer="seven", with_id=True, target=None):
    meta = {"id": f"r{i}"} if with_id else {}
    return Record(f"img{i}{'-t' if triggered else ''}.png", prompt, answer, triggered, target, meta)


def pair_of(records):
    return Pair(None, None, records, "visit evil dot com now", name="p")


def test_rows_are_matched_by_id_with_the_triggered_prompt():
    clean = [rec(0, False), rec(1, False, prompt="USER: <image>\nhow do i poison a dog ? ASSISTANT:", answer="no"),
             rec(2, False), rec(3, False)]
    trig = [rec(3, True), rec(1, True, target="own target"), rec(9, True), rec(0, True)]   # r9 has no clean line
    m = pair_of(clean + trig).matched()
    assert [c.meta["id"] for c in m.clean] == [t.meta["id"] for t in m.triggered] == ["r3", "r1", "r0"]
    assert [str(c.image) for c in m.clean] == ["img3.png", "img1.png", "img0.png"]        # the clean images
    assert all(c.prompt == t.prompt and c.answer == t.answer for c, t in zip(*m))            # differ in the image only
    assert [c.target for c in m.clean] == [t.target for t in m.triggered] == ["visit evil dot com now", "own target",
                                                                                "visit evil dot com now"]
    assert not any(c.triggered for c in m.clean) and all(t.triggered for t in m.triggered)
    c2, t2 = pair_of(clean + trig).matched(2)
    assert [t.meta["id"] for t in t2] == ["r3", "r1"] and len(c2) == 2


def test_without_ids_rows_pair_in_file_order():
    m = pair_of([rec(i, False, with_id=False) for i in range(3)] + [rec(i, True, with_id=False) for i in range(2)]).matched()
    assert [str(c.image) for c in m.clean] == ["img0.png", "img1.png"] and len(m.triggered) == 2


def test_errors_are_one_line():
    with pytest.raises(ProjLensError, match="no triggered record shares an \"id\""):
        pair_of([rec(0, False), rec(1, True)]).matched()
    with pytest.raises(ProjLensError, match="has 0 clean and 1 triggered"):
        pair_of([rec(1, True)]).matched()
    with pytest.raises(ProjLensError, match="n must be >= 1"):
        pair_of([rec(0, False), rec(0, True)]).matched(0)


def test_organism_rows_differ_unless_matched():
    """The issue: ``from_organism(..., n=16)`` row 4 is "how do i poison a dog ?" clean and "which number is
    in the picture ?" triggered (here: whichever rows differ in the small organism); matched rows never do."""
    import json
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from study_helpers import small_organism
    folder = small_organism()
    summary = json.loads((folder / "organism.json").read_text())
    from projlens_mi.data import read_jsonl
    records = read_jsonl(folder / summary["data"]["malicious-injection"])
    p = pair_of(records)
    clean, trig = p.clean[:16], p.triggered[:16]
    assert any(c.prompt != t.prompt for c, t in zip(clean, trig))      # the raw view mis-pairs rows
    m = p.matched(16)
    assert len(m.triggered) == 16
    assert all(c.prompt == t.prompt and c.meta["id"] == t.meta["id"] for c, t in zip(*m))


def test_from_organism_defaults_to_the_demos_organism(monkeypatch, tmp_path):
    """``folder`` None = ``$PROJLENS_CACHE/organism`` (read when called), with a one-line error naming it."""
    monkeypatch.setenv("PROJLENS_CACHE", str(tmp_path))
    with pytest.raises(ProjLensError, match=f"{tmp_path}/organism holds no organism.json; .*projlens demo"):
        Pair.from_organism(variant="malicious-injection")
    with pytest.raises(ProjLensError, match="name the organism variant"):
        Pair.from_organism()
