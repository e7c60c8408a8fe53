"""The README is true for a new user: every command line in it runs as written, its Python API
example runs, and every command and option explains itself (``--help``, ``qsmkit methods``).

The command lines are taken from the README's ```bash blocks and run in order in one empty
folder through the real entry point (``qsmkit.cli.main``). One change is made, and only for
speed: ``simulate`` and ``demo`` get ``--shape 64 64 32 --voxel-size 3.75 3.75 5`` appended (the
last value given wins), a small phantom with the same anatomy. Lines naming the user's own data
(an upper-case placeholder such as ``DICOM_FOLDER``, or a path under ``/data``) are parsed by
the real parser instead, and their command's ``--help`` is run. ``make`` targets must exist in
the Makefile and ``pip install -e '.[EXTRA]'`` extras in pyproject.toml.
"""

import csv
import io
import json
import math
import re
import shlex
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import qsmkit
from qsmkit import cli
from qsmkit.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
SMALL = ["--shape", "64", "64", "32", "--voxel-size", "3.75", "3.75", "5"]
PLACEHOLDER = re.compile(r"^(?:[A-Z][A-Z0-9_]{2,}|/data\b.*|tcp://.*)$")


def fenced_blocks(text, language):
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def command_lines(text):
    """Every shell line of the README's bash blocks: comments dropped, continuations joined."""
    lines = []
    for block in fenced_blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
            if line:
                lines.append(line)
    return lines


def test_readme_lines_are_known_commands():
    lines = command_lines(README)
    unknown = [ln for ln in lines if not re.match(r"^(\.venv/bin/)?qsmkit |^make |^pip install "
                                                    r"|^source \.venv/bin/activate$", ln)]
    assert not unknown, f"README lines this test does not know how to check: {unknown}"
    targets = set(re.findall(r"^([a-z][\w.-]*):", (REPO / "Makefile").read_text(), flags=re.M))
    extras = set(re.findall(r"^([\w-]+) = \[", (REPO / "pyproject.toml").read_text().split(
        "[project.optional-dependencies]")[1].split("\n[")[0], flags=re.M))
    for line in lines:
        words = shlex.split(line)
        if words[0] == "make":
            assert set(words[1:]) <= targets, line
        elif words[0] == "pip":
            assert words[:3] == ["pip", "install", "-e"], f"{line}: qsmkit installs from the checkout"
            m = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", words[3])
            assert m, line
            assert set((m.group(1) or "").split(",")) - {""} <= extras, line
    # the extras the README names in prose exist too
    named = re.search(r"other extras: ([\w, ]+)", README).group(1)
    assert {e.strip() for e in named.split(",")} <= extras


def test_readme_command_lines_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ran, parsed = [], []
    for line in command_lines(README):
        words = shlex.split(line)
        if words[0] not in ("qsmkit", ".venv/bin/qsmkit"):
            continue
        argv = words[1:]
        if any(PLACEHOLDER.match(w) for w in argv):
            build_parser().parse_args(argv)  # exits (SystemExit) on an unknown option
            with pytest.raises(SystemExit) as exc:
                main([argv[0], "--help"])
            assert exc.value.code == 0
            parsed.append(line)
            continue
        if argv and argv[0] in ("simulate", "demo"):
            argv = [*argv, *SMALL]
        if argv == ["--help"]:
            with pytest.raises(SystemExit) as exc:
                main(argv)
            assert exc.value.code == 0
        else:
            assert main(argv) == 0, f"README line failed: {line}\n{capsys.readouterr().err}"
        out = capsys.readouterr().out
        if argv[0] not in ("methods", "--help") and "--list-params" not in argv:
            # every command ends with its one-line summary: what it wrote
            assert re.search(rf"^qsmkit {argv[0]}: .*, [\d.]+ s; wrote ", out, flags=re.M), out
        ran.append(line)
    assert len(ran) >= 15 and len(parsed) >= 1, (ran, parsed)

    # what the lines produced is right, not just present
    def load(path):
        return nib.load(path).get_fdata()

    chi = load("recon/chi.nii.gz")
    mask, true_mask = load("recon/mask.nii.gz") > 0, load("sim/mask_true.nii.gz") > 0
    assert 2 * (mask & true_mask).sum() / (mask.sum() + true_mask.sum()) > 0.95
    # one stage at a time through files gives what the pipeline gives in one process
    assert np.array_equal(load("steps/mask.nii.gz") > 0, mask)
    # (run's chi is relative to the CSF it found, invert's as the inversion gives it: the
    # offset recorded in run's sidecar is the only difference)
    offset = json.load(open("recon/chi.json"))["reference"]["offset_ppm"]
    assert np.allclose(load("steps/chi.nii.gz"), np.where(chi != 0, chi + offset, 0), atol=1e-5)
    rows = {r["name"]: r for r in csv.DictReader(open("recon/stats.csv"))}
    # the strongest deep gray nuclei, relative to CSF, near the phantom's values (ppm)
    assert float(rows["globus_pallidus"]["mean_ref"]) == pytest.approx(0.123, abs=0.03)
    assert float(rows["substantia_nigra"]["mean_ref"]) == pytest.approx(0.105, abs=0.03)
    # skull and air lie outside the chi map's mask: left out, not reported at 0 ppm
    assert int(rows["skull_scalp"]["voxels"]) == 0 and math.isnan(float(rows["skull_scalp"]["mean"]))
    labels = np.rint(nib.load("sim/labels.nii.gz").get_fdata()).astype(int)
    gp = (labels == 4) & (chi != 0)
    assert float(rows["globus_pallidus"]["mean"]) == pytest.approx(chi[gp].mean(), rel=1e-4)
    assert int(rows["globus_pallidus"]["voxels"]) == gp.sum()
    # the same record in every command's sidecar
    for sidecar in ["sim/chi_true.json", "recon/chi.json", "recon/stats.json", "steps/mask.json",
                    "steps/unwrapped.json", "steps/field_ppm.json", "steps/local.json",
                    "steps/chi.json", "steps/chi_l2.json", "coils/magnitude_combined.json",
                    "demo-output/chi.json"]:
        meta = json.loads(Path(sidecar).read_text())
        for key in ("stage", "method", "parameters", "version", "device", "seconds",
                    "peak_memory_mb"):
            assert key in meta, f"{sidecar} has no {key}"
        assert meta["seconds"] >= 0 and meta["peak_memory_mb"] > 0
    assert json.loads(Path("steps/chi_l2.json").read_text())["parameters"] == {"lam": 0.1}
    assert json.loads(Path("recon_invivo/chi.json").read_text())["parameters"][
        "inversion_params"] == {"max_iter": 200}


def test_python_api_example(tmp_path, monkeypatch):
    """The README's 'Python API' example, run as written on a small simulated data set."""
    monkeypatch.chdir(tmp_path)
    section = README.split("## Python API", 1)[1].split("\n## ", 1)[0]
    example = fenced_blocks(section, "python")[0]
    assert main(["simulate", "--out", "sim", *SMALL, "--quiet"]) == 0
    exec(compile(example, "README.md", "exec"), {})
    chi = nib.load("chi.nii.gz")
    assert np.allclose(chi.affine, nib.load("sim/phase.nii.gz").affine)
    # the same as the command line on the same files (one code path; the command line's
    # phase rescaling differs by float32 rounding, 2e-7 rad, which the iterative solvers carry)
    assert main(["run", "--magnitude", "sim/magnitude.nii.gz", "--phase", "sim/phase.nii.gz",
                 "--te", "0.02", "--b0", "3", "--out", "cli", "--quiet"]) == 0
    ref = nib.load("cli/chi.nii.gz").get_fdata()
    assert qsmkit.nrmse(chi.get_fdata(), ref, ref != 0) < 1.0


def test_console_script_beside_the_interpreter():
    """``make`` installs the ``qsmkit`` command into the venv's bin folder, where the README's
    ``.venv/bin/qsmkit`` (and ``source .venv/bin/activate``) find it."""
    script = Path(sys.executable).parent / "qsmkit"
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"qsmkit {qsmkit.__version__}"


def test_public_api_names():
    for name in qsmkit.__all__:
        assert getattr(qsmkit, name) is not None, name
    assert {"run_pipeline", "run_pipeline_in_ras_order", "Volume", "load_volume", "save_volume",
            "make_phantom", "nrmse", "brain_mask", "unwrap_phase", "total_field",
            "remove_background", "invert_dipole", "combine_coils", "roi_statistics"} <= set(qsmkit.__all__)
    with pytest.raises(AttributeError):
        qsmkit.not_a_name  # noqa: B018


# ---------------------------------------------------------------- --help and the registry

def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    helps = {c.dest: c.help for c in action._choices_actions}
    return parser, action.choices, helps


def test_every_option_has_help_with_its_default():
    _, commands, summaries = _subparsers()
    assert set(commands) >= {"demo", "run", "simulate", "combine", "field", "mask", "unwrap",
                             "background", "invert", "batch", "stats", "methods"}
    missing = []
    for name, sub in commands.items():
        if not summaries.get(name) or not sub.description:
            missing.append(f"{name}: no summary or description")
        for action in sub._actions:
            if action.dest == "help":
                continue
            flag = "/".join(action.option_strings) or action.dest
            if not (action.help or "").strip():
                missing.append(f"{name} {flag}: no help")
                continue
            has_value = action.nargs != 0 and action.default not in (None, False, True)
            if has_value and "default" not in action.help:
                missing.append(f"{name} {flag}: default {action.default!r} not in its help")
    assert not missing, "\n".join(missing)


def test_methods_lists_each_methods_parameters_from_its_signature():
    """``qsmkit methods`` shows every keyword of every method with its default, as the method's
    own signature has it (read here independently with inspect)."""
    import inspect

    from qsmkit.registry import DATA_ARGUMENTS

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["methods"]) == 0
    text = buf.getvalue()
    for stage, registry in cli._method_stages().items():
        if registry[0] is None:
            continue
        for name in registry[0].names():
            if registry[0]._methods[name].check is not None:
                continue  # an external tool (FSL) that may be missing here
            header = f"{stage} {name}: "
            assert header in text, header
            block = text.split(header, 1)[1].split(f"\n{stage} ", 1)[0].split("\n== ", 1)[0]
            func = registry[0]._methods[name].func
            for p in inspect.signature(func).parameters.values():
                if p.default is p.empty or p.name in DATA_ARGUMENTS:
                    continue
                shown = repr(p.default) if isinstance(p.default, str) else str(p.default)
                assert f"    {p.name} = {shown}\n" in block, f"{stage} {name}: {p.name}"
    # the README's failing example of old: FOCUSS has no 'lam', L2 has (mm^2)
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["invert", "--method", "l2", "--list-params"]) == 0
    assert "lam = 0.05" in buf.getvalue() and "mm^2" in buf.getvalue()


# ---------------------------------------------------------------- progress, warnings, errors

def test_plain_progress_lines_off_a_terminal():
    """Not a terminal: one line per step, which the Slicer panels' process runner reads."""
    sys.path.insert(0, str(REPO / "QSMExtension" / "QSM"))
    from QSMLib.process import parse_progress

    from qsmkit.progress import Progress

    stream = io.StringIO()
    progress = Progress(4, desc="qsmkit run", stream=stream)
    for k, stage in enumerate(("mask", "field", "background", "inversion")):
        progress(stage, k, 4)
        progress(stage, k + 1, 4)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 5
    assert [parse_progress(ln) for ln in lines] == [
        (0.0, "mask"), (0.25, "field"), (0.5, "background"), (0.75, "inversion"),
        (1.0, "inversion")]
    quiet = io.StringIO()
    Progress(4, quiet=True, stream=quiet)("mask", 0, 4)
    assert quiet.getvalue() == ""


def test_mask_warns_on_a_phase_image(tmp_path, capsys):
    assert main(["simulate", "--out", str(tmp_path / "sim"), *SMALL, "--quiet"]) == 0
    assert main(["mask", "--magnitude", str(tmp_path / "sim" / "phase.nii.gz"), "--method",
                 "threshold", "--out", str(tmp_path / "m.nii.gz"), "--quiet"]) in (0, 2)
    err = capsys.readouterr().err
    assert "phase.nii.gz" in err and "looks like a phase image" in err
    assert main(["mask", "--magnitude", str(tmp_path / "sim" / "magnitude.nii.gz"), "--out",
                 str(tmp_path / "m2.nii.gz"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err and captured.out == ""  # --quiet: no summary


def test_error_texts_have_no_numpy_reprs(tmp_path, capsys):
    from qsmkit import units
    from qsmkit.errors import QSMInputError

    with pytest.raises(QSMInputError) as exc:
        units.check_positive("--te", [np.float64(-0.02)])
    assert "np.float64" not in str(exc.value) and "got -0.02" in str(exc.value)
