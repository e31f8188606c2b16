"""The report folder and the CLI around it: text from models and data never becomes markup, the
report's order and footer, the report-level figures, and progress output off a terminal.

One study over the small organism is run through the CLI (progress on, stderr a pipe) in a folder
whose name holds a space and a quote; the other tests read or re-render copies of it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from study_helpers import REPO, projlens, small_organism, user_pair_toml, write  # noqa: E402

from projlens_mi.study import render  # noqa: E402
from projlens_mi.study.report import _clip, _slug, findings_verdicts, regenerate_command, report_order  # noqa: E402

HOSTILE = {
    "prompt": "USER: <image>\n<script>alert(1)</script> [x](javascript:alert(2)) ASSISTANT:",
    "output": "<img src=x onerror=alert(3)> ![t](http://evil.example/t.png) <a href=\"javascript:alert(4)\">c</a> "
              "[y](javascript:alert(5)) `tick` | pipe **bold** &amp;",
    "target": "<b onmouseover=alert(6)>visit</b> [evil](javascript:alert(7))",
    "error": "ValueError: <iframe src=javascript:alert(8)> ![e](http://evil.example/e.png)",
}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One finished study, run as a user would, stderr a pipe (not a terminal)."""
    org = small_organism()
    root = tmp_path_factory.mktemp("report") / "we ird 'dir'"
    cfg = write(root / "my study.toml", user_pair_toml(org))
    out = root / "out"
    r = projlens("study", "run", cfg, "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr
    return cfg, out, r


def test_progress_off_a_terminal_is_plain_lines(study):
    _, _, r = study
    err = r.stderr
    assert "\r" not in err and "\x1b" not in err, "a progress bar's redraws reached a log"
    lines = err.splitlines()
    assert "[1/3] evaluate/malicious-injection: done in" in err
    assert any(re.fullmatch(r"\[2/2\] figures of analysis/\S+", line) for line in lines)
    assert not any("%|" in line or "it/s]" in line for line in lines)     # no bar glued to a message


def test_report_rerender_shows_progress(study, tmp_path):
    _, out, _ = study
    work = tmp_path / "out"
    shutil.copytree(out, work)
    r = projlens("report", work)
    assert r.returncode == 0, r.stderr
    assert "drawing the figures of 2 analysis steps" in r.stderr and "[2/2] figures of" in r.stderr
    assert "\r" not in r.stderr


def test_help_prints_brackets_literally():
    r = projlens("study", "run", "--help")
    assert r.returncode == 0
    assert "[run] device_map" in " ".join(r.stdout.split())


def test_report_order_targets_and_figures(study):
    _, out, _ = study
    md = (out / "report.md").read_text()
    heads = [line for line in md.splitlines() if line.startswith("## ")]
    assert heads == ["## Setting", "## Backdoor behaviour", "## What the projector update adds", "## Other analyses",
                     "## The paper's findings vs this study"]
    assert "  - `malicious-injection`: `visit evil dot com now`" in md
    figs = {p.name for p in (out / "figures").iterdir()}
    assert {"evaluation.png", "summary.png", "findings.png"} <= figs
    assert "(figures/findings.png)" in md and "(figures/summary.png)" in md
    assert "<br>" not in md
    order = report_order(["probe", "weight_delta", "spectrum", "patching", "neurons"])
    assert [(h, names) for h, _, names in order] == [("Where the backdoor acts", ["patching"]),
                                                     ("What the projector update adds", ["spectrum"]),
                                                     ("Controls and alternative explanations", ["neurons", "probe"]),
                                                     ("Other analyses", ["weight_delta"])]


def test_regenerate_line_runs_as_printed(study):
    """The footer's command, pasted into a shell inside the report folder, recomputes nothing and
    writes the same report (the paths hold a space and a quote: they must be shell-quoted)."""
    cfg, out, _ = study
    md = (out / "report.md").read_text()
    (cmd,) = re.findall(r"Regenerate \(from this folder; stored steps are reused\): `(projlens [^`]+)`", md)
    assert cmd == regenerate_command(json.loads((out / ".steps" / "manifest.json").read_text()))
    assert shlex.split(cmd) == ["projlens", "study", "run", str(cfg.resolve()), "--out", "."]
    before = md
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(["bash", "-c", cmd], cwd=out, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "0 of 3 steps to compute" in r.stderr
    assert (out / "report.md").read_text() == before


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_model_and_data_text_never_becomes_markup(study, tmp_path):
    """A hostile generation, prompt, target and error message are shown as the characters they are."""
    _, out, _ = study
    work = tmp_path / "out"
    shutil.copytree(out, work)
    man_path = work / ".steps" / "manifest.json"
    man = json.loads(man_path.read_text())
    step = next(s for s in man["steps"] if s["kind"] == "evaluate")
    path = work / ".steps" / f"{step['key']}.json"
    payload = json.loads(path.read_text())
    ev = payload["evaluation"]
    ev["target"] = HOSTILE["target"]
    ev["models"]["poisoned"]["examples"] = [{"prompt": HOSTILE["prompt"], "output": HOSTILE["output"], "triggered": True}]
    path.write_text(json.dumps(payload))
    failed = next(s for s in man["steps"] if s["kind"] == "analysis")
    (work / ".steps" / f"{failed['key']}.json").unlink()        # as if this step had failed
    failed["error"] = HOSTILE["error"]
    man["config"]["study"]["title"] = "<script>alert(9)</script> *t*"
    man_path.write_text(json.dumps(man))
    render(work)

    page = (work / "report.html").read_text()
    parser = _Tags()
    parser.feed(page)
    allowed = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "h4", "p", "strong", "em", "code",
               "table", "thead", "tbody", "tr", "th", "td", "ul", "li", "img", "a", "hr"}
    assert {t for t, _ in parser.tags} <= allowed
    for tag, attrs in parser.tags:
        assert not any(k.startswith("on") for k in attrs), (tag, attrs)
        if tag == "img":
            assert attrs["src"].startswith("data:image/png;base64,"), attrs
        if tag == "a":
            assert re.fullmatch(r"(figures|tables)/[\w.-]+", attrs["href"]), attrs
    assert "javascript:" not in "".join(str(a) for _, a in parser.tags)
    assert "evil.example" not in "".join(str(a) for _, a in parser.tags)
    text = "".join(parser.text)
    for s in (HOSTILE["prompt"], _clip(HOSTILE["output"], 100), HOSTILE["target"], HOSTILE["error"]):
        assert " ".join(s.split("\n")) in text, s       # every character still shown (newlines as spaces)
    assert "USER: <image>" in text
    assert "<script>alert(9)</script> *t*" in text


def test_names_from_data_stay_inside_the_folder():
    for name in ("../../etc/passwd", "..", ".hidden", "a/b\\c", "x" * 400, "名前", ""):
        slug = _slug(name)
        assert re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,120}", slug), (name, slug)
    assert _slug("a b") != _slug("a-b") and _slug("spectrum-malicious-injection") == "spectrum-malicious-injection"


def test_findings_verdicts_are_a_function_of_metrics(study):
    def pair(corr, cand):
        return {"analyses": {} if corr is None else {"neurons": {"corr_M": {"ft": corr},
                                                                 "ft": {"max_M_diff": 0.01, "n_quiescent_candidates": cand}}}}
    metrics = {"pairs": {"a": pair(0.99, 0), "b": pair(0.5, 0), "c": pair(None, 0)}}
    low, neurons, shift = findings_verdicts(metrics)
    assert neurons["by_pair"] == {"a": True, "b": False, "c": None}
    assert neurons["pairs"] == [True, False] and neurons["verdict"] == "mixed (1/2 pairs)"
    assert low["verdict"].startswith("no verdict") and shift["by_pair"] == {"a": None, "b": None, "c": None}
    _, out, _ = study       # the study's report draws them as a figure, not only a table
    assert (out / "figures" / "findings.png").read_bytes()[:4] == b"\x89PNG"


def _colorbars(fig, grid) -> int:
    return len(fig.axes) - int(np.prod(grid))


def test_figures_fixed_probability_axes_and_one_colorbar():
    from projlens_mi.analyses.ablation import AblationResult
    from projlens_mi.analyses.patching import PatchingResult
    from projlens_mi.analyses.tracing import TracingResult
    ks, sites = [1, 2], ["projector.out", "llm.0.resid_post"]
    near = np.array([[[0.9688, 0.9705], [0.9690, 0.9701]], [[0.9699, 0.9700], [0.9697, 0.9702]]])
    nan = np.full_like(near, np.nan)
    ab = AblationResult(bases=["dW", "random"], ks=ks, sites=sites, target=near, clean=near,
                        target_sd=np.full((2, 2), 1e-4), clean_sd=np.full((2, 2), 1e-4), asr=nan, accuracy=nan,
                        asr_sd=nan[0], accuracy_sd=nan[0], baseline={"target": 0.97, "clean": 0.97}, metric="prob")
    fig = ab.plot()
    assert all(ax.get_ylim() == (-0.05, 1.05) for ax in fig.axes)       # noise stays flat on a probability axis
    ab.metric = "logprob"
    fig = ab.plot()
    assert len({ax.get_ylim() for ax in fig.axes[:2]}) == 1             # one range per row

    windows = ["0-3", "image", "last"]
    pt = PatchingResult(sites=sites, windows=windows, directions=["denoise", "noise"],
                        effect=np.random.default_rng(0).uniform(-1, 1, (2, 2, 3)), patched_mean=np.zeros((2, 2, 3)),
                        clean_mean=0.0, triggered_mean=1.0)
    assert _colorbars(pt.plot(), (1, 2)) == 1
    tr = TracingResult(corruptions=["clean", "noise"], modes=["full", "direction", "random"], sites=sites,
                       windows=windows, restored=np.random.default_rng(0).uniform(0, 1, (2, 3, 2, 3)),
                       baselines={"clean": {"triggered": 0.9, "corrupted": 0.1},
                                  "noise": {"triggered": 0.9, "corrupted": 0.4}})
    assert _colorbars(tr.plot(), (2, 3)) == 1


def test_terminal_summary_prints_no_control_characters():
    from projlens_mi.study.report import summary_text
    from projlens_mi.study.runner import Outcome
    metrics = {"study": {"title": "t", "config_hash": "h"}, "pairs": {}, "analyses": []}
    outcome = Outcome(status={"evaluate/x": "failed"}, errors={"evaluate/x": "line 3: \x1b[2J\x1b]0;owned\x07 bad\r"})
    text = summary_text(metrics, outcome, Path("out"))
    assert "FAILED evaluate/x: line 3:" in text and not re.search(r"[\x00-\x09\x0b-\x1f\x7f]", text)


def test_report_figures_show_every_value_on_fixed_axes():
    from projlens_mi.study.report import _limits, evaluation_figure, summary_figure
    pairs = {p: {"asr": a, "clean_accuracy": 0.97, "false_trigger_rate": 0.0, "target": "t", "n_clean": 4,
                 "n_triggered": 4, "reference": {"base": {"asr": 0.0, "clean_accuracy": 1.0, "false_trigger_rate": 0.0},
                                                 "control": {"asr": 0.0, "clean_accuracy": 0.97, "false_trigger_rate": 0.0}},
                 "analyses": {"shift": {"energy_k1": {"clean": e}}}}
             for p, a, e in (("a", 1.0, 0.9688), ("b", 0.5, 0.9705))}
    metrics = {"pairs": pairs, "analyses": ["shift"]}
    fig = evaluation_figure(metrics)
    for ax in fig.axes:
        assert not ax.texts                                       # no value labels to overlap
        assert ax.get_xlim() == (-0.04, 1.04)
        points = [c.get_offsets() for c in ax.collections]
        assert len(points) == 3 and all(len(p) == 2 and np.isfinite(np.asarray(p)).all() for p in points)
    fig = summary_figure(metrics)
    shift_ax = next(ax for ax in fig.axes if ax.get_title().startswith("shift"))
    assert shift_ax.get_xlim() == (0.0, 1.0)                      # 0.9688 vs 0.9705 is not an effect
    assert _limits("baselines.clean.corrupted") is None and _limits("corr_M.ft") == (-1.0, 1.0)


def test_terminal_summary_escapes_control_characters_in_errors():
    """A failed step's error can quote a data file or a model: the end-of-run summary (as the CLI's --quiet
    line) prints it on one line with escape codes shown as text, never sent to the terminal."""
    from types import SimpleNamespace

    from projlens_mi.errors import printable
    from projlens_mi.study.report import summary_text
    error = "ValueError: bad \x1b[31mred\x1b[0m\nsecond line\x07"
    assert printable(error) == "ValueError: bad \\x1b[31mred\\x1b[0m second line\\x07"
    metrics = {"study": {"title": "t", "config_hash": "h"}, "pairs": {}, "asr": None, "clean_accuracy": None,
               "false_trigger_rate": None, "incomplete": [], "analyses": []}
    outcome = SimpleNamespace(errors={"analysis/x/p": error}, status={"analysis/x/p": "failed"}, seconds={},
                              wall_seconds=1.0)
    text = summary_text(metrics, outcome, Path("out"))
    assert "FAILED analysis/x/p: " + printable(error) in text
    assert "\x1b" not in text and "\x07" not in text
