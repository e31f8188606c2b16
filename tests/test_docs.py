"""The docs work as written.

Every fenced Python block of README.md, docs/*.md and docs/analyses/*.md runs, unchanged, in a fresh
Python process: the blocks of one document in order, in one namespace (a reader's notebook session),
with ``PROJLENS_CACHE`` pointing at a folder whose ``organism`` is the small test organism (so
``Pair.from_organism(variant=...)`` finds it, as it finds the one ``projlens demo`` built). A block
that cannot run on a CPU here says so in its fence: ```` ```python gpu ```` (needs a GPU), ``hub``
(downloads a model), ``network`` (a remote service), ``signatures`` (an API listing, not code);
any other tag fails. After the run, ``CLAIMS[doc]`` checks what the text around the blocks says
(values, shapes, signs) on the values the session left behind. Documents are discovered, so a new
page or block is covered without touching this file (a claim check is added here when its text
makes one). The full-organism variant (``slow``) checks the claims that need a working backdoor.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from study_helpers import REPO, projlens, small_organism  # noqa: E402

RUNNER = Path(__file__).with_name("docs_runner.py")
PY_LANGS = {"python", "py", "python3"}
TAGS = {"gpu": "needs a GPU", "hub": "downloads a model from the hub", "network": "calls a remote service",
        "signatures": "an API listing, not code"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)(?P<info>[^\n]*)\n(?P<body>.*?)^(?P=indent)(?P=fence)[ \t]*$",
                   re.M | re.S)


def documents() -> list[Path]:
    return sorted([REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "docs" / "analyses").glob("*.md")])


def python_blocks(doc: Path) -> list[dict]:
    """Every fenced block whose language is Python: ``{"line", "tags", "code"}`` in document order."""
    text = doc.read_text()
    out = []
    for m in FENCE.finditer(text):
        words = m.group("info").strip().split()
        if not words or words[0].lower() not in PY_LANGS:
            continue
        indent = len(m.group("indent"))
        code = "".join(line[indent:] if line[:indent].strip() == "" else line
                       for line in m.group("body").splitlines(keepends=True))
        out.append({"line": text.count("\n", 0, m.start()) + 1, "tags": words[1:], "code": code})
    return out


def rel(doc: Path) -> str:
    return str(doc.relative_to(REPO))


RUNNABLE = [rel(d) for d in documents() if any(not b["tags"] for b in python_blocks(d))]


def test_every_python_block_runs_or_says_why_not():
    """Tags are from the known list; the discovery sees the docs' blocks (a broken fence would hide them)."""
    bad = [f"{rel(d)}:{b['line']}: {' '.join(b['tags'])}" for d in documents() for b in python_blocks(d)
           if not set(b["tags"]) <= set(TAGS)]
    assert not bad, f"unknown python block tags (allowed: {', '.join(TAGS)}): {bad}"
    assert {"README.md", "docs/interactive.md", "docs/engine.md"} <= set(RUNNABLE)


# --- running a document -----------------------------------------------------------------------


def run_doc(doc: str, organism: Path, cwd: Path, timeout: int = 900) -> dict:
    """The document's untagged Python blocks, in order, in a fresh process; returns the runner's JSON."""
    cache = cwd / "projlens-cache"
    cache.mkdir(exist_ok=True)
    if not (cache / "organism").exists():
        (cache / "organism").symlink_to(organism, target_is_directory=True)
    blocks = [b for b in python_blocks(REPO / doc) if not b["tags"]]
    files = []
    for i, b in enumerate(blocks):
        f = cwd / ".doc-blocks" / f"{Path(doc).stem}-{i}-line{b['line']}.py"
        f.parent.mkdir(exist_ok=True)
        f.write_text(b["code"])
        files.append(str(f))
    out = cwd / ".doc-blocks" / "result.json"
    env = {**os.environ, "PROJLENS_CACHE": str(cache), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    r = subprocess.run([sys.executable, str(RUNNER), str(out), *files], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=timeout)
    res = json.loads(out.read_text()) if out.is_file() else {"ran": 0, "error": r.stderr[-3000:], "values": {}}
    assert res["error"] is None and res["ran"] == len(blocks), \
        f"{doc}: {res['ran']} of {len(blocks)} blocks ran; {res['error']}\n{r.stderr[-2000:]}"
    return res["values"]


def setup_studies(cwd: Path, organism: Path) -> None:
    """docs/studies.md's "Your own pair in four steps": the folders it names, its config as written,
    restricted to four records and one cheap analysis (keys of its table) so the run takes seconds."""
    (cwd / "models").mkdir()
    for name, src in (("llava-base", "base"), ("llava-poisoned", "malicious-injection")):
        shutil.copytree(organism / src, cwd / "models" / name)
    shutil.copytree(organism / "data", cwd / "data")
    shutil.copy(cwd / "data" / "malicious-injection.jsonl", cwd / "data" / "test.jsonl")
    toml = next(m.group("body") for m in FENCE.finditer((REPO / "docs" / "studies.md").read_text())
                if m.group("info").strip() == "toml" and "[backdoor]" in m.group("body"))
    toml = "\n".join(line.strip() for line in toml.splitlines())
    toml = toml.replace('file = "data/test.jsonl"', 'file = "data/test.jsonl"\nn = 4')
    (cwd / "my-study.toml").write_text(toml + '\n[analyses]\nonly = ["spectrum"]\n')


SETUP = {"docs/studies.md": setup_studies}


# --- what the text claims ---------------------------------------------------------------------


def close(a, b, tol=1e-5) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


def claims_readme(v: dict, cwd: Path, full: bool) -> None:
    # the snippet patches all of the clean rows' image tokens with the triggered ones: the image enters
    # the language model only there, so the result is the triggered rows' own log-probability
    assert v["lp"]["shape"] == [16] and v["lp_trig"]["shape"] == [16]
    assert all(close(a, b) for a, b in zip(v["lp"]["values"], v["lp_trig"]["values"]))
    assert len(v["prefix"]) == 16
    if full:   # malicious-injection: the target follows the answer, the prefix is the answer
        assert sum(bool(p) for p in v["prefix"]) >= 12


def claims_interactive(v: dict, cwd: Path, full: bool) -> None:
    sites, recovery = v["sites"], v["recovery"]
    assert len(recovery) == len(sites) and sites[:2] == ["projector.out", "llm.0.resid_pre"]
    assert recovery[0] == pytest.approx(1.0, abs=1e-5) and recovery[1] == pytest.approx(1.0, abs=1e-5)   # "exactly"
    assert len(v["prefix"]) == 8 and len(v["ks"]) == len(v["asr_top"]) == len(v["asr_random"])
    assert all(0.0 <= a <= 1.0 for a in v["asr_top"] + v["asr_random"])
    assert v["asr_top"][0] == v["asr_random"][0]            # k = 0 removes nothing: the same model
    from PIL import Image
    with Image.open(cwd / "interactive.png") as im:          # figsize (10, 3.5) at dpi 110
        assert im.size == (1100, 385)
    if full:   # "triggered log p close to 0, clean far below"; the backdoor fires
        assert v["lp_trig"] > -1.0 and v["lp_trig"] - v["lp_clean"] > 5.0, (v["lp_clean"], v["lp_trig"])
        assert all(r < 0.1 for r in recovery[2:])            # "from layer 1 on ... almost nothing"
        # "fires on all eight rows", "random subspaces ... leave it at 1.0", "0.75, 0.25, 0.5 and 0 for
        # k = 1, 2, 4 and 8 ... read these as ± one row": the rows still firing, each within one of the text
        assert v["ks"] == [0, 1, 2, 4, 8] and v["asr_top"][0] == 1.0 and set(v["asr_random"]) == {1.0}
        firing = [round(8 * a) for a in v["asr_top"][1:]]
        assert all(abs(f - doc) <= 1 for f, doc in zip(firing, [6, 2, 4, 0])), firing
        assert sum(bool(p) for p in v["prefix"]) >= 6          # the answer comes first


def claims_engine(v: dict, cwd: Path, full: bool) -> None:
    import numpy as np
    pattern = np.array(v["pattern"]["values"])             # [rows, heads, query, key]
    assert pattern.ndim == 4 and pattern.shape[0] == 4 and pattern.shape[2] == pattern.shape[3]
    assert np.allclose(pattern[:, :, -1].sum(-1), 1.0, atol=1e-5) and (pattern >= 0).all()   # real query rows sum to 1
    assert v["table"]["columns"] == ["-3", "-2", "-1"] and 3 * v["table"]["rows"] == len(v["cells"])   # layers × positions
    assert v["corner"]["shape"][:2] == [4, 4]                # 4 rows × the 2×2 region's 4 tokens
    assert v["corner"]["shape"][2] == v["clean_cache"]["Site('llm.1.resid_pre')"]["shape"][2]   # d (the LLM's width)
    assert v["ablated"]["shape"][:2] == [4, pattern.shape[2]]               # the head-0 edit's logits [rows, seq, vocab]
    assert v["frame"]["columns"] == ["layer", "position", "input", "value"] and v["frame"]["rows"] == 4 * len(v["cells"])


def claims_studies(v: dict, cwd: Path, full: bool) -> None:
    m = json.loads((cwd / "runs" / "mine" / "metrics.json").read_text())
    assert m["pairs"]["llava-poisoned"]["n_triggered"] == 4 and "spectrum" in m["pairs"]["llava-poisoned"]["analyses"]
    assert (cwd / "runs" / "mine" / "report.md").is_file()


def claims_audit(v: dict, cwd: Path, full: bool) -> None:
    out = cwd / "audit-out"
    data = json.loads((out / "audit.json").read_text())
    assert v["verdict"] == data["verdict"] in ("backdoored", "clean") and v["score"] == data["score"]
    assert (v["score"] >= v["threshold"]) == (v["verdict"] == "backdoored")
    assert v["candidates"]["columns"][:2] == ["text", "score"]
    assert v["candidates"]["rows"] == len(data["targets"]) if len(data["targets"]) < 20 else v["candidates"]["rows"] >= 20
    assert {"score", "candidates"} <= set(v["figures"]) and (out / "figures" / "score.png").is_file()
    assert (out / "repaired").is_dir() == (data["repaired"] == "repaired")
    assert (v["verdict"] == "backdoored") == ("flagged" in v)   # the guard block ran exactly when a guard exists
    if "flagged" in v:
        assert len(v["flagged"]) == 8 and len(v["texts"]) == 8
        assert v["watched_flags"] == v["flagged"]      # watching() scores as monitor() does
    # the trigger block ran exactly when a trigger was reconstructed (backdoored), and wrote what it says
    assert (v["verdict"] == "backdoored") == ("other" in v) == (cwd / "trigger.png").is_file()
    if "other" in v:
        assert [x["type"] for x in v["shown"]] == ["Image", "Image"] and v["t"]["type"] == "TriggerResult"
        assert (out / "trigger.png").is_file() and (out / "figures" / "trigger.png").is_file()
        assert "trigger" in v["figures"]
    if full:   # "visit evil dot com now": the target is named on the organism's malicious-injection model
        assert v["verdict"] == "backdoored" and "visit evil dot com now" in data["targets"][0]["text"]


CLAIMS = {"README.md": claims_readme, "docs/audit.md": claims_audit, "docs/interactive.md": claims_interactive, "docs/engine.md": claims_engine,
          "docs/studies.md": claims_studies}


@pytest.fixture(scope="module")
def org():
    return small_organism()


@pytest.mark.parametrize("doc", RUNNABLE)
def test_document_runs_as_written(doc, org, tmp_path):
    if doc in SETUP:
        SETUP[doc](tmp_path, org)
    values = run_doc(doc, org, tmp_path)
    if doc in CLAIMS:
        CLAIMS[doc](values, tmp_path, full=False)


@pytest.mark.slow
@pytest.mark.parametrize("doc", ["README.md", "docs/interactive.md", "docs/audit.md"])
def test_document_claims_on_the_full_organism(doc, tmp_path):
    """The claims that need a working backdoor, on the organism ``projlens demo`` uses (built if missing)."""
    from projlens_mi.settings import default_organism
    folder = default_organism()
    r = projlens("organism", "build", "--out", folder, "--quiet")
    assert r.returncode == 0, r.stderr
    CLAIMS[doc](run_doc(doc, folder, tmp_path), tmp_path, full=True)


def test_user_pair_study_from_the_docs(org, tmp_path):
    """The CLI path of docs/studies.md: lay out folders as it describes, its config (+ cheap analyses only)."""
    setup_studies(tmp_path, org)
    r = projlens("study", "run", "my-study.toml", "--out", "runs/mine", "--plan", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = projlens("study", "run", "my-study.toml", "--out", "runs/mine", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "runs" / "mine" / "metrics.json").read_text())
    assert m["pairs"]["llava-poisoned"]["n_triggered"] == 4 and m["asr"] is not None
    assert "spectrum" in m["pairs"]["llava-poisoned"]["analyses"]
    assert "report:" in r.stdout
