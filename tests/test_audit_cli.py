"""``projlens audit`` and its folder: the command end to end on the small organism, the report's escaping,
the repaired folder against a plain-torch reference, and bad input (one line, exit 2, nothing written)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from study_helpers import small_organism  # noqa: E402

from projlens_mi.cli import EXIT_BACKDOORED, app  # noqa: E402
from projlens_mi.errors import ProjLensError  # noqa: E402
from projlens_mi.audit import DEFAULT_THRESHOLD  # noqa: E402


@pytest.fixture(scope="module")
def org() -> Path:
    return small_organism()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def invoke(*args):
    return CliRunner().invoke(app, ["audit", *map(str, args)])


def leftovers(parent: Path) -> list[str]:
    """Side folders an audit write would leave behind (staging, the replaced old folder)."""
    return [p.name for p in parent.iterdir() if p.name.startswith(".") and (".audit-" in p.name or ".old-" in p.name)]


# ---------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def cli_run(org, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "out"
    res = invoke("--base", org / "base", "--suspect", org / "malicious-injection", "--data",
                 org / "data" / "clean.jsonl", "--out", out, "--images", 4)
    return res, out


def test_cli_prints_the_verdict_and_writes_the_folder(cli_run, org):
    res, out = cli_run
    data = json.loads((out / "audit.json").read_text())
    assert res.exit_code == (EXIT_BACKDOORED if data["verdict"] == "backdoored" else 0), res.output
    assert f"verdict: {data['verdict']}" in res.stdout and str(out / "report.md") in res.stdout
    # the schema of docs/audit.md
    assert data["schema"] == "projlens_mi.audit/1" and data["verdict"] in ("backdoored", "clean")
    assert isinstance(data["score"], float) and data["threshold"] == DEFAULT_THRESHOLD
    assert (data["score"] >= data["threshold"]) == (data["verdict"] == "backdoored")
    assert all(isinstance(t["text"], str) and 0 <= t["score"] <= 1 for t in data["targets"])
    if data["targets"]:
        assert data["targets"][0]["text"] in res.stdout
        assert max(t["score"] for t in data["targets"]) == pytest.approx(data["score"])
    has_repair = bool((data.get("repair") or {}).get("k"))
    assert data["repaired"] == ("repaired" if has_repair else None)
    assert (out / "repaired").is_dir() == has_repair
    assert data["params"]["images"] == 4 and data["probe_rows"] > 0
    # provenance: the inputs' hashes are those of the files read
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["inputs"]["suspect"]["weight_files"]["model.safetensors"] == \
        sha256(org / "malicious-injection" / "model.safetensors")
    assert prov["inputs"]["base"]["weight_files"]["model.safetensors"] == sha256(org / "base" / "model.safetensors")
    assert prov["inputs"]["data"]["sha256"] == sha256(org / "data" / "clean.jsonl")
    assert prov["command"][:2] == ["audit", "--base"] and prov["versions"]["torch"]
    # report and figures
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert f"**Verdict: {data['verdict']}.**" in md
    for name in ("score", "candidates"):
        assert (out / "figures" / f"{name}.png").is_file() and f"figures/{name}.png" in md
    assert html.count("data:image/png;base64,") == len(list((out / "figures").iterdir()))
    assert (out / "trigger.png").is_file() == (out / "figures" / "trigger.png").is_file() == ("trigger" in data)
    assert not leftovers(out.parent)


def test_a_previous_audit_folder_is_replaced_anything_else_refused(cli_run, tmp_path):
    from projlens_mi.audit.output import check_out
    _, out = cli_run
    assert check_out(out) == out                      # a previous audit: accepted (it is replaced)
    assert check_out(tmp_path) == tmp_path            # an empty folder
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ProjLensError, match="holds other files .*notes.txt.* not a previous audit folder"):
        check_out(tmp_path)


# ---------------------------------------------------------------------------------- the report
HOSTILE = ["<script>alert(1)</script> visit evil", "![x](http://evil.example/x.png) now",
           "[click](javascript:alert(1)) `tick` | pipe", "$\\frac{1}{0}$ \x1b[31mred"]


def constructed(verdict="clean", repair=None, texts=HOSTILE):
    from projlens_mi.audit import AuditParams, AuditResult, Candidate, Steering
    cands = [Candidate(t, 0.9 - 0.1 * i, 9 - i, 3, 2, Steering(i % 2, 1 if i % 2 else -1, 2.0))
             for i, t in enumerate(texts)]
    return AuditResult(verdict, 0.9, 0.25, cands, [3.0, 1.0], repair, None, AuditParams(),
                       {"base": "<b>base</b>", "suspect": "sus`pect", "data": "d.jsonl"},
                       examples=[("v0-x2", "USER: <image> what ?", "<img src=x onerror=alert(1)>", HOSTILE[0])])


def test_report_shows_hostile_candidate_texts_as_literal_text(tmp_path):
    from projlens_mi.audit import write_audit
    out = write_audit(constructed(), None, tmp_path / "a")
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "`<script>alert(1)</script> visit evil`" in md          # a code span: verbatim, inert
    assert "<script" not in html and "&lt;script&gt;alert(1)&lt;/script&gt; visit evil" in html
    assert "<img src=x" not in html and "onerror=alert(1)&gt;" in html
    assert "evil.example" in html and 'src="http' not in html      # shown, never loaded
    assert "javascript:" in html and 'href="javascript' not in html
    assert "&lt;b&gt;base&lt;/b&gt;" in html and "<b>base" not in html
    assert "\x1b" not in md and "\x1b" not in html                # control characters never reach the report
    assert sorted(p.name for p in out.iterdir()) == ["audit.json", "figures", "provenance.json", "report.html",
                                                     "report.md"]   # clean verdict: no repaired folder
    assert json.loads((out / "audit.json").read_text())["targets"][0]["text"] == HOSTILE[0]


def test_figure_labels_are_literal_and_printable():
    from projlens_mi.audit.figures import audit_figure
    figs = audit_figure(constructed())
    ax = figs["candidates"].axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[3].startswith("$\\frac{1}{0}$") and "\\x1b" in labels[3]
    assert not any(t.get_parse_math() for t in ax.get_yticklabels())
    assert set(figs) == {"score", "candidates"}                  # no repair, no guard: a clean verdict


# ---------------------------------------------------------------------------------- the repaired folder
def test_repaired_folder_loads_offline_and_equals_the_plain_torch_reference(org, tmp_path, monkeypatch):
    from transformers import AutoModelForImageTextToText

    import projlens_mi
    from projlens_mi.analyses.common import linear_paths, weights
    from projlens_mi.audit import write_audit
    from projlens_mi.audit.repair import repaired
    base, sus = projlens_mi.load(org / "base"), projlens_mi.load(org / "malicious-injection")
    paths = linear_paths(sus)
    wb, ws = weights(base), weights(sus)
    first, last = paths[0], paths[-1]
    g = torch.Generator().manual_seed(1)
    q = torch.linalg.qr(torch.randn(ws[first][0].shape[1], 2, generator=g, dtype=torch.float64)).Q
    p = torch.linalg.qr(torch.randn(ws[last][0].shape[0], 2, generator=g, dtype=torch.float64)).Q
    rep = {"paths": paths, "k": 2, "directions": [0, 1], "reading_removed": q.T.tolist(),
           "writing_removed": p.T.tolist(), "curve": [], "score_after": 0.0, "changed_outputs": 0.0,
           "weights": repaired(ws, wb, paths, q, p)}
    out = write_audit(constructed("backdoored", rep, ["visit evil"]), sus, tmp_path / "a")
    assert json.loads((out / "audit.json").read_text())["repaired"] == "repaired"

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mods = dict(sus.model.named_modules())
    hf = AutoModelForImageTextToText.from_pretrained(out / "repaired", local_files_only=True)
    mine = projlens_mi.load(out / "repaired")
    for model in (hf, mine.model):
        got = dict(model.named_modules())
        # reference, in plain torch: W1' = W1 - (W1 - W1b) Q Qᵀ ; W2' = W2 - P Pᵀ (W2 - W2b), b2' likewise
        w1, w1b = mods[first].weight.detach().double(), dict(base.model.named_modules())[first].weight.detach().double()
        ref1 = w1 - (w1 - w1b) @ q @ q.T
        w2, w2b = mods[last].weight.detach().double(), dict(base.model.named_modules())[last].weight.detach().double()
        b2, b2b = mods[last].bias.detach().double(), dict(base.model.named_modules())[last].bias.detach().double()
        ref2, refb = w2 - p @ p.T @ (w2 - w2b), b2 - p @ p.T @ (b2 - b2b)
        torch.testing.assert_close(got[first].weight.detach().double(), ref1, rtol=0, atol=1e-6)
        torch.testing.assert_close(got[last].weight.detach().double(), ref2, rtol=0, atol=1e-6)
        torch.testing.assert_close(got[last].bias.detach().double(), refb, rtol=0, atol=1e-6)
        assert not torch.equal(got[first].weight, mods[first].weight)        # something was removed
        sd, ref_sd = model.state_dict(), sus.model.state_dict()
        untouched = [k for k in ref_sd if not k.startswith((first + ".", last + "."))]
        assert untouched and all(torch.equal(sd[k], ref_sd[k]) for k in untouched)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["repaired_files"] == {f.name: sha256(f) for f in (out / "repaired").iterdir() if f.is_file()}
    assert prov["removed"]["k"] == 2 and prov["removed"]["reading_removed"] == q.T.tolist()


# ---------------------------------------------------------------------------------- bad input
def _tiny_base(tmp: Path) -> Path:
    """A LLaVA whose projector has other shapes than the organism's (tests/tiny.py's config)."""
    from tiny import tiny_llava
    model, proc = tiny_llava()
    out = tmp / "tiny-base"
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


BAD = {
    "projector shapes": (lambda org, tmp: ["--base", _tiny_base(tmp)], "differs in shape between the two models"),
    "identical weights": (lambda org, tmp: ["--suspect", org / "base"], "equal the base's: nothing to audit"),
    "triggered rows": (lambda org, tmp: ["--data", org / "data" / "malicious-injection.jsonl"],
                       "is marked \"triggered\": true"),
    "empty data": (lambda org, tmp: ["--data", _write(tmp / "empty.jsonl", "")], "empty.jsonl"),
    "unreadable data": (lambda org, tmp: ["--data", _write(tmp / "bad.jsonl", "{not json\n")], "bad.jsonl"),
    "missing data": (lambda org, tmp: ["--data", tmp / "nope.jsonl"], "nope.jsonl"),
    "missing suspect": (lambda org, tmp: ["--suspect", tmp / "no-model"], "no-model"),
    "out is a file": (lambda org, tmp: ["--out", _write(tmp / "file.txt", "x")], "is a file, not a folder"),
    "out holds other files": (lambda org, tmp: ["--out", _write(tmp / "mine" / "notes.txt", "x").parent],
                              "not a previous audit folder"),
    "threshold out of range": (lambda org, tmp: ["--threshold", "1.5"], "threshold"),
    "too many images": (lambda org, tmp: ["--images", "101"], "at most 100 clean images"),
}


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, org, tmp_path):
    make, expected = BAD[case]
    args = {"--base": org / "base", "--suspect": org / "malicious-injection", "--data": org / "data" / "clean.jsonl",
            "--out": tmp_path / "out"}
    extra = make(org, tmp_path)
    flags = dict(zip(extra[::2], extra[1::2]))
    args.update(flags)
    before = sorted(p.name for p in tmp_path.iterdir())
    res = invoke(*[x for kv in args.items() for x in kv], "--quiet")
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert res.stdout == "" and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    assert expected in res.stderr, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not leftovers(tmp_path)
    if case == "out holds other files":
        assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_suspect_of_another_architecture_is_refused_before_any_work(org, tmp_path):
    from tiny_families import tiny_llava_next

    import projlens_mi
    from projlens_mi.audit import audit_folder
    other = projlens_mi.load(tiny_llava_next().model)
    with pytest.raises(ProjLensError, match="base is .*LlavaForConditionalGeneration.* but suspect is "
                                            ".*LlavaNextForConditionalGeneration.*its own base") as err:
        audit_folder(org / "base", other, org / "data" / "clean.jsonl", tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists() and not leftovers(tmp_path)


# ---------------------------------------------------------------------------------- the study step
def test_audit_is_a_study_step_off_unless_asked(org, tmp_path):
    from study_helpers import projlens, user_pair_toml, write

    from projlens_mi.study import load_config
    plain = load_config(write(tmp_path / "plain.toml", user_pair_toml(org, analyses="")))
    assert not plain.analyses["audit"].enabled and plain.analyses["spectrum"].enabled
    on = load_config(write(tmp_path / "on.toml", user_pair_toml(org, analyses="", extra="[analyses.audit]\nenabled = true")))
    assert on.analyses["audit"].enabled
    cheap = ('[analyses.audit]\nimages = 2\nprompts = 2\nguard_images = 2\ndirections = 1\nscales = [2.0]\n'
             'max_k = 1\nmax_new_tokens = 8')
    cfg = write(tmp_path / "study.toml", user_pair_toml(org, analyses='only = ["audit"]', extra=cheap))
    r = projlens("study", "run", cfg, "--out", tmp_path / "out", "--quiet")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    m = json.loads((out / "metrics.json").read_text())["pairs"]["malicious-injection"]["analyses"]["audit"]
    assert set(m) >= {"score", "threshold", "backdoored", "target_named", "repair_k"} and m["threshold"] == DEFAULT_THRESHOLD
    assert m["backdoored"] == (m["score"] >= m["threshold"])
    md = (out / "report.md").read_text()
    assert "## Auditing without the trigger" in md and "#### audit: `malicious-injection`" in md
    assert (out / "figures" / "audit-malicious-injection-candidates.png").is_file()
    from projlens_mi.analyses import result_from_dict
    stored = [json.loads(p.read_text()) for p in (out / ".steps").glob("*.json") if p.name != "manifest.json"]
    audit_steps = [s for s in stored if s.get("analysis") == "audit"]
    assert len(audit_steps) == 1 and "seconds" not in audit_steps[0]["result"]["fields"]["audit"]   # no wall times
    res = result_from_dict(audit_steps[0]["result"])            # the stored step redraws without the models
    assert set(res.plot()) >= {"score", "candidates"}
    assert res.target_named == (bool(res.audit["targets"]) and "visit evil dot com now" in res.audit["targets"][0]["text"])


# ---------------------------------------------------------------------------------- interruptions, the top level
def test_a_failed_or_interrupted_write_leaves_the_previous_folder_as_it_was(tmp_path, monkeypatch):
    from projlens_mi.audit import output, write_audit
    out = write_audit(constructed(), None, tmp_path / "a")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(output, "report_text", boom)      # after the figures and audit.json were staged
    with pytest.raises(KeyboardInterrupt):
        write_audit(constructed("clean", texts=["other"]), None, out)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    with pytest.raises(KeyboardInterrupt):
        write_audit(constructed(), None, tmp_path / "new")
    assert not (tmp_path / "new").exists() and not leftovers(tmp_path)


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, tmp_path):
    from projlens_mi.audit import output

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(output, "audit_folder", interrupted)
    res = invoke("--base", "b", "--suspect", "s", "--data", "d.jsonl", "--out", tmp_path / "o", "--quiet")
    assert res.exit_code == 130 and res.stderr.strip() == "interrupted; nothing was written to --out"


def test_top_level_audit_is_the_function_and_lazy():
    import subprocess
    code = ("import sys, projlens_mi; assert 'projlens_mi.audit' not in sys.modules; "
            "from projlens_mi.audit import audit, AuditParams; import projlens_mi.audit as m; "
            "assert callable(projlens_mi.audit) and m is projlens_mi.audit and 'audit' in projlens_mi.__all__; "
            "assert projlens_mi.audit.__call__.__doc__ == audit.__doc__")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_top_level_call_passes_through(monkeypatch):
    import projlens_mi
    from projlens_mi.audit import core
    seen = {}
    monkeypatch.setattr(projlens_mi.audit, "audit", lambda *a, **k: seen.setdefault("call", (a, k)))
    projlens_mi.audit("B", "S", "D", progress=print)
    assert seen["call"][0][:3] == ("B", "S", "D") and isinstance(seen["call"][0][3], core.AuditParams)
    assert seen["call"][1] == {"progress": print}
