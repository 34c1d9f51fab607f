"""A method and a plug-in from outside the package (tests/extending/, docs/extending.md): registered by call and
by entry point, run through ``fastdd.distill`` and the command line; the registry's and the protocol's refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastdd
from fastdd import registry
from fastdd.cli import main

EXTENDING = Path(__file__).resolve().parent
sys.path.insert(0, str(EXTENDING))  # the examples are imported as an installed package's modules would be

from example_method import SPEC  # noqa: E402
from example_plugin import TotalVariation  # noqa: E402

TINY = {"dataset": "digits", "ipc": 1, "iterations": 2, "batch_real": 8, "model": "ConvNetW32", "eval_models": 0}
TINY_ARGS = ["--dataset", "digits", "--ipc", "1", "--iterations", "2", "--batch-real", "8", "--model", "ConvNetW32",
             "--eval-models", "0", "--quiet"]


@pytest.fixture
def registered(monkeypatch):
    """The example method and plug-in registered, in a registry thrown away after the test."""
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    monkeypatch.setattr(registry, "_PLUGINS", dict(registry._PLUGINS))
    fastdd.register_method(SPEC)
    fastdd.register_plugin(TotalVariation)


def entry_points_folder(folder: Path, lines: dict[str, list[str]]) -> Path:
    """A ``*.dist-info`` folder in ``folder`` declaring the entry points ``lines`` (group -> "name = module:attr")."""
    info = folder / "fastdd_examples-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fastdd-examples\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("".join(f"[{group}]\n" + "\n".join(entries) + "\n\n"
                                                   for group, entries in lines.items()))
    return folder


def test_example_method_and_plugin_run_through_distill(tmp_path, registered):
    config = fastdd.RunConfig(**TINY, method="meanmatch", meanmatch_noise=0.1, plugins=("tv",), tv_weight=0.5,
                              out=str(tmp_path / "run"))
    assert config.meanmatch_noise == 0.1 and config.tv_weight == 0.5
    result = fastdd.distill(config, progress=False)
    assert bool(torch.isfinite(result.synset.images).all())
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["method"] == "meanmatch" and recorded["meanmatch_noise"] == 0.1 and recorded["tv_weight"] == 0.5
    assert result.synset.meta["hparams"]["tv.weight"] == 0.5 and result.synset.meta["hparams"]["noise"] == 0.1
    assert result.config.eval_config().epochs == 300
    plan = fastdd.plan(fastdd.RunConfig(**TINY, method="meanmatch"), steps=1, progress=False)
    assert plan.memory.step == () and "declares no memory terms" in plan.memory.notes[0]


def test_example_method_and_plugin_through_the_command_line(tmp_path, registered, capsys):
    assert main(["distill", *TINY_ARGS, "--method", "meanmatch", "--meanmatch-noise", "0.1", "--plugin", "tv",
                 "--tv-weight", "0.5", "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["tv_weight"] == 0.5
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    shown = capsys.readouterr().out
    assert "--meanmatch-noise STD" in shown and "weight of the total-variation penalty (default 0.01)" in shown


def test_installed_entry_points_work_from_a_new_process(tmp_path):
    site = entry_points_folder(tmp_path, {"fastdd.methods": ["meanmatch = example_method:SPEC"],
                                          "fastdd.plugins": ["tv = example_plugin:TotalVariation"]})
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(EXTENDING), str(root)])}
    done = subprocess.run([sys.executable, "-m", "fastdd", "distill", *TINY_ARGS, "--method", "meanmatch",
                           "--plugin", "tv", "--out", str(tmp_path / "run")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["method"] == "meanmatch" and recorded["plugins"] == ["tv"] and recorded["tv_weight"] == 0.01


def test_an_entry_point_that_fails_to_load_is_one_line_naming_it(tmp_path, monkeypatch):
    broken = entry_points_folder(tmp_path, {"fastdd.methods": ["broken = no_such_module:SPEC"]})
    monkeypatch.syspath_prepend(str(broken))
    monkeypatch.setattr(registry, "_FAILED", set())
    with pytest.raises(ValueError) as error:
        fastdd.RunConfig(method="broken")
    message = str(error.value)
    assert "entry point 'broken' = no_such_module:SPEC (group fastdd.methods) failed to load" in message
    assert "\n" not in message


def test_a_method_registered_twice_is_refused_in_one_line(registered):
    with pytest.raises(ValueError, match=r"^method 'meanmatch' is already registered \(by example_method\)"):
        fastdd.register_method(SPEC)
    with pytest.raises(ValueError, match=r"^plug-in 'tv' is already registered"):
        fastdd.register_plugin(TotalVariation)


def test_a_plugin_refused_for_a_method_it_does_not_support_when_the_run_is_built(tmp_path):
    class NeedsRealBatches(fastdd.Plugin):
        name = "needsreal"

        @classmethod
        def supports(cls, method: fastdd.MethodSpec) -> bool:
            return "real_batches" in method.traits

    with pytest.raises(ValueError) as error:
        fastdd.distill(fastdd.RunConfig(**TINY, method="dm", out=str(tmp_path / "run")), plugins=[NeedsRealBatches()],
                       progress=False)
    assert str(error.value) == "--plugin needsreal applies to --method dc, dsa, dcc, dsac, idc, not dm"


def test_a_plugin_instance_is_recorded_and_a_resume_with_another_is_refused(tmp_path):
    config = fastdd.RunConfig(**TINY, method="dc", plugins=("sdc",), out=str(tmp_path / "run"))
    fastdd.distill(config, plugins=[TotalVariation(0.5)], progress=False)
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["plugins"] == ["sdc", "tv"] and recorded["plugin_hparams"] == {"tv": {"weight": 0.5}}
    with pytest.raises(ValueError, match=r"differing in plugin_hparams .*; use another run directory"):
        fastdd.distill(config, plugins=[TotalVariation(0.25)], resume=True, progress=False)
    with pytest.raises(ValueError, match=r"differing in plugin_hparams .*plugins"):
        fastdd.distill(config, resume=True, progress=False)
    with pytest.raises(ValueError, match="each plug-in may be given once"):
        fastdd.distill(config, plugins=[TotalVariation(0.5), TotalVariation(0.1)], overwrite=True, progress=False)


def test_a_plugin_named_without_from_options_is_built_with_no_arguments_or_refused_in_one_line():
    """The default ``from_options``: a plug-in without options is built as ``cls()``; one whose constructor needs
    arguments is a one-line ValueError telling to give it as an instance."""

    class Plain(fastdd.Plugin):
        name = "plain"

    class NeedsWeight(fastdd.Plugin):
        name = "needs-weight"

        def __init__(self, weight: float) -> None:
            self.weight = weight

    dc = registry.method_spec("dc")
    assert isinstance(Plain.from_options(None, dc, 1), Plain)
    with pytest.raises(ValueError, match=r"^plug-in 'needs-weight' cannot be built by name .*; give it as an "
                                         r"instance: fastdd.distill\(config, plugins=\[\.\.\.\]\)$"):
        NeedsWeight.from_options(None, dc, 1)
