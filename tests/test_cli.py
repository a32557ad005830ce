"""The command line: ``dcmkd models``, ``dcmkd describe``, the command itself and its warnings."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from dcmkd.cli import main
from dcmkd.models import list_models


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_models_json_lists_every_model_with_params_and_macs(capsys):
    code, out, _ = run(capsys, "models", "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert set(rows) == set(list_models())
    # torch's FLOP counter: ResNet-50 4.09 GMACs, WRN-28-10 5.25 GMACs (published figures)
    assert abs(rows["resnet50"]["macs"] / 4.09e9 - 1) < 0.02
    assert abs(rows["wrn28_10"]["macs"] / 5.25e9 - 1) < 0.02
    assert rows["resnet18"]["params"] == 11689512


def test_describe_json(capsys):
    code, out, _ = run(capsys, "describe", "wrn28_10", "--classifiers", "C1+C2C3C4", "--json")
    assert code == 0
    d = json.loads(out)
    cls = {c["name"]: c for c in d["classifiers"]}
    assert list(cls) == ["C1", "C2", "C3", "C4"]
    assert cls["C4"]["tap"] == "conv1"
    assert [(b["count"], b["widths"][0]) for b in cls["C3"]["blocks"]] == [(4, 320), (2, 640)]
    assert {c["downsamplings"] for c in cls.values()} == {2}
    assert d["params_backbone"] < d["params_total"]


def test_describe_text_and_apfc(capsys):
    code, out, _ = run(capsys, "describe", "densenet40_12", "--aux", "apfc", "--num-classes", "10")
    assert code == 0 and "apfc" in out and "10 classes" in out


@pytest.mark.parametrize("argv,needle", [
    (["describe", "resnet1100"], "valid choices: densenet100_12"),
    (["describe", "resnet110", "--aux", "wide"], "valid choices: apfc, default, narrow"),
    (["describe", "resnet110", "--classifiers", "C2,C4"], "valid choices: C2, C3"),
])
def test_bad_names_exit_nonzero_with_one_line(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert code == 2 and needle in err and err.count("\n") == 1


def test_python_dash_m_dcmkd_is_the_command():
    """``python -m dcmkd`` (what ``torchrun -m dcmkd`` runs) is ``dcmkd``."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "dcmkd", "train", "-m", "nope"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "unknown method 'nope'" in p.stderr.lower() \
        and "Traceback" not in p.stderr, p.stderr


def test_every_package_imports_on_its_own():
    """``import dcmkd.report`` first must not be a circular import (it once was: report reads
    experiments, whose package imported the runner, which imported report)."""
    import subprocess
    import sys
    code = ("import importlib, sys\n"
            "for name in sys.argv[1:]:\n"
            "    for m in [m for m in sys.modules if m == 'dcmkd' or m.startswith('dcmkd.')]:\n"
            "        del sys.modules[m]\n"
            "    importlib.import_module(name)\n")
    packages = ["dcmkd." + p for p in ("report", "recipes", "engine", "data", "methods",
                                       "models", "heads", "losses", "run_folder", "cli")]
    done = subprocess.run([sys.executable, "-c", code, *packages], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_warning_is_one_line_naming_no_source_file(capsys, monkeypatch):
    import warnings

    import dcmkd.cli as cli

    def warns(args):
        warnings.warn("SSKD stage6: the stage hit its cap", UserWarning)
        return 0

    monkeypatch.setattr(cli, "cmd_models", warns)
    before = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        code, _, err = run(capsys, "models")
    assert code == 0 and err == "dcmkd: warning: SSKD stage6: the stage hit its cap\n"
    assert warnings.showwarning is before                  # restored after the command


def test_a_closed_pipe_ends_the_command_quietly(monkeypatch, capsys):
    import io

    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert main(["models"]) == 141                    # as a process killed by SIGPIPE
    assert capsys.readouterr().err == ""


def _command_sent_sigterm(args) -> int:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(2)   # the handler raises within the sleep
    return 0


@pytest.mark.skipif(signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL,
                    reason="this process handles SIGTERM already")
def test_sigterm_ends_a_command_like_ctrl_c_with_status_143(monkeypatch, capsys):
    import dcmkd.cli
    monkeypatch.setattr(dcmkd.cli, "cmd_models", _command_sent_sigterm)
    code, _, err = run(capsys, "models")
    assert code == 143
    assert "dcmkd: terminated (SIGTERM); every file of the run is intact" in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # the default is back
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # an ignored SIGTERM stays ignored
    try:
        assert run(capsys, "models")[0] == 0
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_tsne_refuses_a_sample_count_below_1(capsys):
    with pytest.raises(SystemExit) as e:
        main(["tsne", "runs/x", "--samples", "0"])
    assert e.value.code == 2
    assert "argument --samples: expected an integer ≥ 1, got 0" in capsys.readouterr().err


def test_load_run_is_part_of_the_package_api():
    import dcmkd
    from dcmkd.engine.build import load_run
    assert dcmkd.load_run is load_run and "load_run" in dcmkd.__all__


def test_reproduce_names_a_bad_epochs_override(capsys):
    code, _, err = run(capsys, "reproduce", "dcm-table5", "--scale", "smoke", "--dry-run",
                       "epochs=abc")
    assert code == 2 and err.strip() == "dcmkd: error: epochs: expected an integer, got 'abc'"
