"""The ``projlens`` command line: thin wrappers over the library's functions (no logic of its own)."""

from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from .errors import ProjLensError, printable
from .settings import default_organism

# rich_markup_mode=None: help texts are printed as written (rich markup would swallow "[run]"), and
# without box-drawing characters, so --help reads the same in a terminal and in a log.
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="projlens: find how a poisoned vision-language model carries its backdoor.")
organism_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Build the small backdoored model organism.")
app.add_typer(organism_app, name="organism")

DEFAULT_ORGANISM = default_organism()


def _print_version(value: bool) -> None:
    if value:
        from . import __version__
        typer.echo(f"projlens {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")) -> None:
    pass


def _fail(err: Exception) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


INTERRUPTED = "interrupted; run the same command again to resume"
VERIFY_INTERRUPTED = "interrupted; the study folder was not changed"


def _interruptible(message: str):
    """Ctrl-C anywhere in the command: ``message`` on one line, no traceback, exit status 130 (the
    shell's for SIGINT). The library kills its worker processes on the way out and has stored every
    finished step, so a resumable command picks up where it stopped."""
    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            try:
                return command(*args, **kwargs)
            except KeyboardInterrupt:
                typer.echo(("\n" if sys.stderr.isatty() else "") + message, err=True)
                import gc
                gc.freeze()   # the exit skips the collector's last passes over torch's objects: 0.7-1.5 s instead of
                raise typer.Exit(130) from None   # 7-8 s at a load of 13 on 2 CPUs (atexit handlers still run)
        return wrapper
    return decorate


_resumable = _interruptible(INTERRUPTED)


def _quiet_hf() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def metrics_table(summary: dict) -> str:
    rows = [("model", "clean_acc", "ASR", "false_trig", "train_s")]
    for name, m in summary["metrics"].items():
        asr = m.get("asr")
        if asr is None and m.get("asr_by_variant"):
            asr = max(m["asr_by_variant"].values())
            asr_s = f"{asr:.3f}*"
        else:
            asr_s = "" if asr is None else f"{asr:.3f}"
        ftr = m.get("false_trigger_rate")
        rows.append((name, f"{m['clean_accuracy']:.3f}", asr_s, "" if ftr is None else f"{ftr:.3f}",
                     f"{m.get('train_seconds') or 0:.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("* base/control: highest ASR over the four triggers (no backdoor expected)")
    return "\n".join(lines)


@organism_app.command("build")
@_resumable
def organism_build(
    out: Path = typer.Option(..., "--out", help="Folder to write the organism into (reused as a cache)."),
    seed: int = typer.Option(0, help="Seed for data, initialisation and training."),
    small: bool = typer.Option(False, "--small", help="A tiny fast configuration (for tests), not the default organism."),
    threads: int = typer.Option(1, help="torch CPU threads (part of the cache key: results are bit-reproducible per thread count)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Processes to use (default: CPUs / threads): the "
                                          "stage-2 models are trained and evaluated in that many processes, each on "
                                          "--threads threads; never changes the weights or the metrics."),
    quiet: bool = typer.Option(False, "--quiet", help="Print only the final table."),
    as_json: bool = typer.Option(False, "--json", help="Print organism.json instead of the table."),
):
    """Build (or reuse) the base, control and four poisoned models, evaluate them, write organism.json."""
    _quiet_hf()
    from .organism import config as oc
    from .organism.build import build
    try:
        cfg = oc.small() if small else oc.OrganismConfig()
        cfg = replace(cfg, seed=seed, threads=threads)
        summary = build(out, cfg, log=(lambda *a: None) if (quiet or as_json) else (lambda m: typer.echo(m, err=True)),
                        workers=workers)   # None: one per CPU
    except ProjLensError as err:
        _fail(err)
    typer.echo(json.dumps(summary, indent=2) if as_json else metrics_table(summary))


@organism_app.command("zoo")
@_resumable
def organism_zoo(
    out: Path = typer.Option(..., "--out", help="Folder to write the zoo into (reused as a cache, model by model)."),
    small: bool = typer.Option(False, "--small", help="The small configuration and a handful of models (for tests)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Processes that train and evaluate the models "
                                          "(default: one per CPU); never changes the weights or the metrics."),
    quiet: bool = typer.Option(False, "--quiet", help="Print only the final table."),
    as_json: bool = typer.Option(False, "--json", help="Print zoo.json instead of the table."),
):
    """Build (or reuse) the model zoo: the organism's base plus clean, poisoned, unseen-trigger and adaptive
    projector fine-tunes, each evaluated, split into dev / heldout; writes zoo.json (docs/organism.md)."""
    _quiet_hf()
    from .organism.zoo import build_zoo, zoo_table
    try:
        summary = build_zoo(out, log=(lambda *a: None) if (quiet or as_json) else (lambda m: typer.echo(m, err=True)),
                            workers=workers, small=small)
    except ProjLensError as err:
        _fail(err)
    typer.echo(json.dumps(summary, indent=2) if as_json else zoo_table(summary))


study_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                        help="Run a study: a TOML config in, a report folder out.")
app.add_typer(study_app, name="study")

def shipped_study(name: str) -> Path:
    """A study config shipped with the package (``studies/`` installs as ``projlens_mi.studies``)."""
    from importlib import resources
    try:
        path = Path(str(resources.files("projlens_mi.studies") / name))
    except ModuleNotFoundError:   # an editable install made before studies/ was package data
        path = None
    if path is None or not path.is_file():
        raise ProjLensError(f"this installation of projlens_mi lacks studies/{name}; reinstall it "
                            "(`pip install -e .` in a checkout)")
    return path
DEFAULT_DEMO_OUT = Path("projlens-demo")


def _run_overrides(device_map: Optional[str], max_memory: Optional[str], offload_folder: Optional[Path],
                   tp_size: Optional[int], workers: Optional[int]) -> dict:
    """CLI flags that replace ``[run]`` keys (validated with the config, same one-line errors)."""
    run: dict = {}
    for key, text in (("device_map", device_map), ("max_memory", max_memory)):
        if text is not None:
            try:
                run[key] = json.loads(text) if text.lstrip().startswith("{") else text
            except ValueError as err:
                raise ProjLensError(f"--{key.replace('_', '-')} {text!r} is not JSON ({err}); give e.g. "
                                    "'{\"0\": \"70GiB\", \"cpu\": \"200GiB\"}'") from None
    if offload_folder is not None:
        run["offload_folder"] = str(offload_folder.resolve())
    if tp_size is not None:
        run["tp_size"] = tp_size
    if workers is not None:
        run["workers"] = workers
    return run


def _say(msg: str) -> None:
    typer.echo(msg, err=True)


def _run_study(config: Path, out: Path, *, plan: bool, quiet: bool, as_json: bool, organism: Optional[Path] = None,
               header: str = "", run: Optional[dict] = None, data: Optional[dict] = None,
               command: Optional[list] = None) -> None:
    _quiet_hf()
    from . import study
    rank0 = study.torchrun_rank() == 0
    try:
        cfg = study.load_config(config, organism=organism, run=run, data=data)
        if plan:
            rows = study.plan_study(cfg, out)
            typer.echo(json.dumps(rows, indent=2) if as_json else study.format_plan(rows, cfg.run.workers))
            return
        talk = not (quiet or as_json) and rank0
        outcome = study.run_study(cfg, out, log=_say if talk else None, progress=talk, command=command)
    except ProjLensError as err:
        _fail(err)
    if not rank0:
        raise typer.Exit(1 if outcome.failed else 0)
    metrics = json.loads((out / "metrics.json").read_text())
    if as_json:
        typer.echo(json.dumps({"out": str(out), "status": outcome.status, "errors": outcome.errors,
                               "metrics": metrics}, indent=2))
    elif quiet:
        typer.echo(study.one_line(metrics, out))
        for step, error in outcome.errors.items():   # why, even when quiet: one line per failed step
            typer.echo(f"failed: {step}: {printable(error)}", err=True)
    else:
        if header:
            typer.echo(header)
        typer.echo(study.summary_text(metrics, outcome, out))
    if outcome.failed:
        raise typer.Exit(1)


@study_app.command("run")
@_resumable
def study_run(
    config: Path = typer.Argument(..., help="The study config (.toml)."),
    out: Path = typer.Option(..., "--out", help="Report folder (created; reused as the cache of finished steps)."),
    plan: bool = typer.Option(False, "--plan", help="List the steps, which are cached, and their estimated cost; run nothing."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress; print one line at the end."),
    as_json: bool = typer.Option(False, "--json", help="Print the result (status per step and metrics.json) as JSON."),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="Replaces [run] device_map: auto, balanced, "
                                             "balanced_low_0, sequential, a device, or a JSON table {module: device}."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Replaces [run] max_memory: JSON, e.g. "
                                             "'{\"0\": \"70GiB\", \"cpu\": \"200GiB\"}'."),
    offload_folder: Optional[Path] = typer.Option(None, "--offload-folder", help="Replaces [run] offload_folder "
                                                  "(disk offload; relative to the current folder)."),
    tp_size: Optional[int] = typer.Option(None, "--tp-size", help="Replaces [run] tp_size: shard every model over "
                                          "N ranks; launch with torchrun --nproc_per_node N (docs/scaling.md)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Replaces [run] workers: compute steps in N "
                                          "processes (same numbers)."),
    allow_outside_images: bool = typer.Option(False, "--allow-outside-images", help="Sets [data] "
                                              "allow_outside_images: read images outside the data file's folder."),
):
    """Run every step of a study not stored yet and write the report folder (resumable, deterministic)."""
    try:
        run = _run_overrides(device_map, max_memory, offload_folder, tp_size, workers)
    except ProjLensError as err:
        _fail(err)
    data = {"allow_outside_images": True} if allow_outside_images else None
    again = ["study", "run", str(config.resolve())]     # the report's "regenerate" line (with --out .)
    for flag, value in (("--device-map", device_map), ("--max-memory", max_memory), ("--tp-size", tp_size),
                        ("--workers", workers), ("--offload-folder", run.get("offload_folder"))):
        if value is not None:
            again += [flag, str(value)]
    if allow_outside_images:
        again.append("--allow-outside-images")
    _run_study(config, out, plan=plan, quiet=quiet, as_json=as_json, run=run, data=data, command=again)


@app.command("report")
@_resumable
def report_cmd(out: Path = typer.Argument(..., help="A study's report folder.")):
    """Re-render metrics.json, tables, figures and report.md/html from stored results (no recomputation)."""
    _quiet_hf()
    from .study import render
    try:
        render(out, log=_say, workers=None)   # the study's [run] workers; a line per figure drawn
    except ProjLensError as err:
        _fail(err)
    typer.echo(f"report: {out / 'report.md'} and {out / 'report.html'}")


@app.command()
@_interruptible(VERIFY_INTERRUPTED)
def verify(
    out: Path = typer.Argument(..., help="A study's report folder (metrics.json, provenance.json, .steps/)."),
    steps: Optional[list[str]] = typer.Option(None, "--steps", help="Re-compute only these steps (a step id such as "
                                              "evaluate/PAIR, or a prefix such as analysis/spectrum); repeatable."),
    flips: int = typer.Option(0, "--flips", help="Flipped samples tolerated in each generation-based rate."),
    work: Optional[Path] = typer.Option(None, "--work", help="Re-compute into this new folder and keep it "
                                        "(default: a temporary folder, removed)."),
    all_rows: bool = typer.Option(False, "--all", help="List every number that changed, not only the largest."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress while re-computing."),
):
    """Re-compute a study's steps beside it and compare every number of metrics.json (docs/verify.md).

    Exit 0: every number within its tolerance and no verdict changed; 1: something moved, or the
    inputs changed; 2: not a study folder, unreadable metrics/config, or an unknown step."""
    _quiet_hf()
    from .study.verify import verify as run_verify
    try:
        result = run_verify(out, steps=steps, flips=flips, work=work,
                            log=None if quiet else (lambda m: typer.echo(m, err=True)))
    except ProjLensError as err:
        _fail(err)
    typer.echo(result.text(all_rows=all_rows))
    raise typer.Exit(result.exit_code)


@app.command()
@_resumable
def demo(
    out: Path = typer.Option(DEFAULT_DEMO_OUT, "--out", help="Report folder of the quickstart study."),
    organism: Path = typer.Option(DEFAULT_ORGANISM, "--organism", help="Where the organism is built / cached."),
    plan: bool = typer.Option(False, "--plan", help="Only list the steps and their estimated cost."),
    quiet: bool = typer.Option(False, "--quiet", help="Print only the final summary."),
):
    """The main job: build (or reuse) the organism, run the quickstart study (four variants, every analysis)."""
    header = ""
    if not plan:
        _quiet_hf()
        from .data import check_writable_folder
        from .organism.build import build
        try:
            check_writable_folder(out)   # before the organism is built, not after
            summary = build(organism, log=(lambda *a: None) if quiet else (lambda m: typer.echo(m, err=True)),
                            workers=None)
        except ProjLensError as err:
            _fail(err)
        header = f"organism: {organism}\n{metrics_table(summary)}\n"
    try:
        quickstart = shipped_study("quickstart.toml")
    except ProjLensError as err:
        _fail(err)
    _run_study(quickstart, out, plan=plan, quiet=quiet, as_json=False, organism=organism, header=header,
               command=["demo", "--organism", str(organism.resolve())])


AUDIT_INTERRUPTED = "interrupted; nothing was written to --out"
EXIT_BACKDOORED = 3   # docs/audit.md "Exit codes": 0 clean, 3 backdoored, 2 bad input, 130 interrupted


UNITS = {"probe": "steer", "trigger": "step"}   # stages reported j of n (the repair: k tried, its own line)
AFTER_PROBE = "probe done; when backdoored: the repair (the probe again for each k tried), the guard, the trigger"


def _audit_progress(talk: bool):
    """``progress(stage, j, n)`` for the probe's steers and the repair's k: a bar per stage on a terminal,
    otherwise one plain line per few steps (as ``study run``)."""
    if not talk:
        return None, lambda: None
    from .study.runner import progress_bars_shown
    bars = {}
    if progress_bars_shown():
        from tqdm.auto import tqdm

        def step(stage, j, n):
            bar = bars.get(stage) or bars.setdefault(stage, tqdm(desc=stage, unit=UNITS.get(stage, "k"), leave=False))
            bar.total = n
            bar.update(j - bar.n)
            if j == n or stage == "repair":
                if j == n:
                    bar.close()
                if stage == "probe" and j == n:
                    _say(AFTER_PROBE)
        return step, lambda: [b.close() for b in bars.values()]

    def line(stage, j, n):
        if stage == "repair":
            _say(f"repair: k = {j} of at most {n} tried")
            return
        if j == n or j % max(1, n // 4) == 0:
            _say(f"{stage}: {j}/{n} {UNITS[stage]}s")
        if j == n and stage == "probe":
            _say(AFTER_PROBE)
    return line, lambda: None


@app.command("audit")
@_interruptible(AUDIT_INTERRUPTED)
def audit_cmd(
    base: str = typer.Option(..., "--base", help="The public base checkpoint (HF folder or hub id)."),
    suspect: str = typer.Option(..., "--suspect", help="The fine-tune nobody trusts (HF folder or hub id)."),
    data: Path = typer.Option(..., "--data", help="Clean JSONL (image, prompt; answer may be empty; no triggered rows)."),
    out: Path = typer.Option(..., "--out", help="Audit folder to write (new, empty, or a previous audit's: replaced)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Verdict threshold on the probe score "
                                              "(default: the one calibrated on clean fine-tunes, docs/audit.md)."),
    images: Optional[int] = typer.Option(None, "--images", help="Distinct clean images in the probe grid (<= 100)."),
    no_trigger: bool = typer.Option(False, "--no-trigger", help="Skip the trigger reconstruction (needed for "
                                    "families other than LLaVA-1.5)."),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="Placement of both models, as in load "
                                             "(auto, sequential, or a JSON {module: device}; docs/scaling.md)."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="JSON {device: size} for --device-map."),
    offload_folder: Optional[Path] = typer.Option(None, "--offload-folder", help="Where offloaded weights go "
                                                  "(outside the checkpoints)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress; print one line."),
):
    """Audit a suspect fine-tune against its base without its trigger: detect, name and remove a
    projector backdoor (docs/audit.md).

    Exit 0: clean; 3: backdoored (DIR/repaired holds the repaired model when a repair was found);
    2: bad input (nothing written); 130: interrupted (nothing written)."""
    _quiet_hf()
    from .audit import AuditParams
    from .audit.figures import label
    from .audit.output import audit_folder
    progress, done = _audit_progress(not quiet)
    try:
        given = {k: v for k, v in (("threshold", threshold), ("images", images)) if v is not None}
        params = AuditParams(**given, trigger=not no_trigger)
        placement = _run_overrides(device_map, max_memory, offload_folder, None, None)
        command = ["audit", "--base", base, "--suspect", suspect, "--data", str(data), "--out", str(out),
                   *[x for k, v in given.items() for x in (f"--{k}", str(v))], *(["--no-trigger"] if no_trigger else []),
                   *[x for k, v in placement.items() for x in (f"--{k.replace('_', '-')}", json.dumps(v)
                                                              if isinstance(v, dict) else str(v))]]
        result = audit_folder(base, suspect, data, out, params, progress=progress, command=command,
                              log=None if quiet else _say, **placement)
    except ProjLensError as err:
        _fail(err)
    finally:
        done()
    top = result.targets[0] if result.targets else None
    rep = result.repair or {}
    if quiet:
        typer.echo(f"{result.verdict} score={result.score:.3f} threshold={result.threshold:.3f} "
                   f"top={printable(top.text) if top else '-'} report={out / 'report.md'}")
    else:
        typer.echo(f"verdict: {result.verdict} (probe score {result.score:.3f}, threshold {result.threshold:.3f})")
        for i, t in enumerate(result.targets[:5], 1):
            typer.echo(f"  {i}. \"{label(t.text, 70)}\"  score {t.score:.3f} ({t.rows} rows, {t.images} images, "
                       f"{t.prompts} prompts; steer {t.steering.label()})")
        if result.verdict == "backdoored":
            typer.echo(f"repaired: {out / 'repaired'} (k = {rep['k']})" if rep.get("k") else
                       "repaired: none (no k up to max_k stopped the named target; do not deploy the suspect)")
        typer.echo(f"report: {out / 'report.md'} (html: {out / 'report.html'})")
    raise typer.Exit(EXIT_BACKDOORED if result.verdict == "backdoored" else 0)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
