"""The analysis registry: one @analysis(...) call holds everything about an analysis; a name cannot be
taken twice; a missing built-in module is an error, never skipped."""

from __future__ import annotations

import sys
import textwrap

import pytest

import projlens_mi.analyses as analyses_pkg
from projlens_mi.analyses import ANALYSES, MODULES, analysis, import_all
from projlens_mi.errors import ProjLensError
from projlens_mi.study import report


def test_every_builtin_is_registered_once_with_its_metadata():
    import_all()
    builtin = {n: a for n, a in ANALYSES.items() if a.fn.__module__.startswith("projlens_mi.analyses.")}
    assert sorted(builtin) == sorted(MODULES)
    for name, spec in builtin.items():
        assert spec.fn.__module__ == f"projlens_mi.analyses.{name}"
        assert spec.title and spec.paper and spec.headline and spec.passes >= 0, name
        # the report reads the registry (no second table of titles or paper claims)
        assert report._title(name) == spec.title and report._paper(name) == spec.paper + "."
    # the paper's numbers live once: the module's summary text and the registry are the same string
    from projlens_mi.analyses import spectrum
    assert ANALYSES["spectrum"].paper is spectrum.PAPER and "57–65 %" in spectrum.PAPER


def test_duplicate_name_from_another_module_is_an_error():
    before = ANALYSES["spectrum"]

    def impostor(pair, params):
        return None
    impostor.__module__ = "someone_elses_plugin"
    with pytest.raises(ProjLensError, match=r"@analysis\('spectrum'\) in someone_elses_plugin clashes .* "
                                            r"projlens_mi\.analyses\.spectrum; pick another name"):
        analysis("spectrum", object)(impostor)
    assert ANALYSES["spectrum"] is before
    with pytest.raises(ProjLensError, match="invalid"):
        analysis("not a name", object)


def test_plugin_reusing_a_builtin_name_is_refused_by_the_config(tmp_path):
    from projlens_mi.study.config import import_plugins
    (tmp_path / "clash.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass
        from projlens_mi.analyses import analysis
        @dataclass
        class P:
            n: int = 1
        @analysis("norm", P)
        def norm(pair, params):
            return None
    '''))
    before = ANALYSES["norm"]
    with pytest.raises(ProjLensError, match=r"@analysis\('norm'\) in projlens_plugin_\w+ clashes"):
        import_plugins(["clash.py"], tmp_path)
    assert ANALYSES["norm"] is before


def test_a_missing_builtin_module_is_an_error_not_skipped(monkeypatch):
    monkeypatch.setattr(analyses_pkg, "MODULES", MODULES + ("no_such_analysis",))
    with pytest.raises(ModuleNotFoundError, match="no_such_analysis"):
        analyses_pkg.import_all()
    assert "projlens_mi.analyses.no_such_analysis" not in sys.modules
