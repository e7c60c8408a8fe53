"""FSL BET / PRELUDE through fslpy, tested at the process boundary.

A temporary FSLDIR holds stand-in ``bin/bet`` and ``bin/prelude`` (Python scripts run by
this interpreter) that record their argument list and environment, check their input
files, and write a result with the input's header: BET a threshold mask computed from
``-f``, PRELUDE the true unwrapped phase from a side file. The tests assert the exact
command lines fslpy builds, that results come back on the input grid, that a failing
tool's stderr reaches the error, the missing-FSL message, and the ``auto`` rule.
"""

import json
import os
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("fsl.wrappers", reason="needs fslpy (pip install fslpy; it is in the test extra)")

from qsmkit import fsl  # noqa: E402
from qsmkit.errors import QSMInputError  # noqa: E402
from qsmkit.masking import MASKING  # noqa: E402
from qsmkit.unwrapping import UNWRAPPING  # noqa: E402

COMMON = """\
import json, os, sys
import numpy as np
import nibabel as nib
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXT = {"NIFTI_GZ": ".nii.gz", "NIFTI": ".nii"}[os.environ.get("FSLOUTPUTTYPE", "NIFTI_GZ")]
def record(extra):
    with open(os.path.join(HERE, "calls.jsonl"), "a") as f:
        f.write(json.dumps({"argv": sys.argv, "FSLDIR": os.environ.get("FSLDIR"),
                            "FSLOUTPUTTYPE": os.environ.get("FSLOUTPUTTYPE"), **extra}) + "\\n")
def fail_if_asked(tool):
    if os.environ.get("FAKE_FSL_FAIL") == tool:
        sys.stderr.write(tool + ": ERROR: simulated failure\\nImage Exception : #22 :: bad input\\n")
        sys.exit(7)
def header_for(img):
    if os.environ.get("FAKE_FSL_SHIFT"):  # a tool that moves the grid: the caller must notice
        aff = img.affine.copy(); aff[0, 3] += 5.0
        return aff
    return img.affine
"""

BET = COMMON + """\
args = sys.argv[1:]
fail_if_asked("bet")
inp, out, opts = args[0], args[1], args[2:]
f = float(opts[opts.index("-f") + 1]) if "-f" in opts else 0.5
img = nib.load(inp)
data = np.asarray(img.dataobj, dtype=np.float64)
record({"affine": img.affine.tolist(), "shape": list(data.shape)})
mask = (data > f * data.max()).astype(np.uint8)
nib.save(nib.Nifti1Image(mask, header_for(img), img.header), out + "_mask" + EXT)
"""

PRELUDE = COMMON + """\
opts = dict(a[2:].split("=", 1) for a in sys.argv[1:])
fail_if_asked("prelude")
truth = np.load(os.path.join(HERE, "truth.npy"))
pha = nib.load(opts["phase"])
wrapped = np.asarray(pha.dataobj, dtype=np.float64)
expected = np.angle(np.exp(1j * truth))
if np.max(np.abs(np.angle(np.exp(1j * (wrapped - expected))))) > 1e-5:
    sys.stderr.write("prelude: input phase is not the wrapped truth\\n"); sys.exit(3)
mag = np.asarray(nib.load(opts["abs"]).dataobj)
mask = np.asarray(nib.load(opts["mask"]).dataobj) > 0 if "mask" in opts else np.ones(truth.shape, bool)
record({"abs_max": float(mag.max()), "mask_count": int(mask.sum())})
nib.save(nib.Nifti1Image((truth * mask).astype(np.float32), header_for(pha), pha.header),
         opts["out"] + EXT)
"""


def _write_tool(path, body):
    with open(path, "w") as f:
        f.write(f"#!{sys.executable}\n" + textwrap.dedent(body))
    os.chmod(path, 0o755)


@pytest.fixture
def fake_fsl(tmp_path, monkeypatch):
    """A temporary FSL directory with stand-in bet and prelude; FSLDIR points at it."""
    root = tmp_path / "fsl"
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc" / "fslversion").write_text("6.0.7.9:abcdef\n")
    _write_tool(root / "bin" / "bet", BET)
    _write_tool(root / "bin" / "prelude", PRELUDE)
    for var in ("FSLOUTPUTTYPE", "FSLDEVDIR", "FAKE_FSL_FAIL", "FAKE_FSL_SHIFT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FSLDIR", str(root))
    monkeypatch.setattr(fsl, "USE_FSL", "auto")
    monkeypatch.setattr(fsl, "FSL_DIR", None)
    return root


def _calls(root):
    path = root / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _head(shape=(20, 18, 12)):
    """A bright ellipsoid (the 'brain') in a dim background."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = np.sqrt(x**2 + (y / 0.9) ** 2 + (z / 0.8) ** 2)
    return (np.where(r < 0.7, 1000.0, 50.0) + 40 * x).astype(np.float32)


def _embedded(monkeypatch):
    """The embedded methods ``auto`` falls back to (whatever masking.py / unwrapping.py choose)."""
    with monkeypatch.context() as m:
        m.setattr(fsl, "USE_FSL", "never")
        names = MASKING.resolve("auto"), UNWRAPPING.resolve("auto")
    assert names[0] != "bet" and names[1] != "prelude"
    return names


OBLIQUE = np.array([[0.9, -0.3, 0.1, -20.0], [0.3, 0.95, 0.0, 12.0], [0.0, 0.05, 2.0, 40.0], [0, 0, 0, 1]])


# ----------------------------------------------------------------------------- finding FSL


def test_find_fsldir_valid_and_setting_first(fake_fsl, tmp_path, monkeypatch):
    assert fsl.find_fsldir() == str(fake_fsl)
    assert fsl.fsl_available()
    other = tmp_path / "other"
    (other / "bin").mkdir(parents=True)
    with pytest.raises(fsl.FSLNotFoundError) as err:  # the explicit setting wins over $FSLDIR
        fsl.find_fsldir(str(other))
    assert "bin/bet and bin/prelude" in str(err.value) and str(other) in str(err.value)
    monkeypatch.setattr(fsl, "FSL_DIR", str(other))
    assert not fsl.fsl_available()
    assert fsl.find_fsldir(str(fake_fsl)) == str(fake_fsl)
    prov = fsl.provenance(str(fake_fsl))
    assert prov["fsldir"] == str(fake_fsl) and prov["fsl_version"] == "6.0.7.9"


def test_find_fsldir_reports_each_missing_tool(fake_fsl):
    os.remove(fake_fsl / "bin" / "prelude")
    with pytest.raises(fsl.FSLNotFoundError) as err:
        fsl.find_fsldir()
    msg = str(err.value)
    assert "lacks bin/prelude" in msg and "bin/bet" not in msg
    assert fsl.FSL_INSTALL_URL in msg and "\n" not in msg
    os.chmod(fake_fsl / "bin" / "bet", 0o644)  # present but not executable counts as missing
    assert "bin/bet and bin/prelude" in fsl.fsl_unavailable_reason()


def test_missing_fsl_message(monkeypatch):
    monkeypatch.delenv("FSLDIR", raising=False)
    monkeypatch.setattr(fsl, "FSL_DIR", None)
    monkeypatch.setattr(fsl, "USE_FSL", "auto")
    with pytest.raises(fsl.FSLNotFoundError) as err:
        fsl.run_bet(_head(), (1.0, 1.0, 1.0))
    msg = str(err.value)
    assert "FSLDIR is not set" in msg and fsl.FSL_INSTALL_URL in msg
    mask_name, unwrap_name = _embedded(monkeypatch)
    assert f"masking 'auto' uses {mask_name!r}" in msg  # says what is used instead
    assert f"unwrapping 'auto' uses {unwrap_name!r}" in msg
    assert isinstance(err.value, QSMInputError)  # the CLI prints it on one line, exit 2
    with pytest.raises(fsl.FSLNotFoundError, match="install FSL"):
        MASKING.resolve("bet")  # an explicit choice fails before any work
    with pytest.raises(fsl.FSLNotFoundError, match="install FSL"):
        UNWRAPPING.resolve("prelude")


def test_fslpy_missing_is_reported(fake_fsl, monkeypatch):
    monkeypatch.setitem(sys.modules, "fsl.wrappers", None)  # import fsl.wrappers now fails
    assert "fslpy is not installed" in fsl.fsl_unavailable_reason()
    assert MASKING.resolve("auto") == _embedded(monkeypatch)[0]


# ----------------------------------------------------------------------------- auto rule


def test_auto_resolves_to_fsl_only_when_usable(fake_fsl, monkeypatch):
    mask_name, unwrap_name = _embedded(monkeypatch)
    assert MASKING.resolve("auto") == "bet"
    assert UNWRAPPING.resolve("auto") == "prelude"
    monkeypatch.setattr(fsl, "USE_FSL", "never")
    assert MASKING.resolve("auto") == mask_name
    assert UNWRAPPING.resolve("auto") == unwrap_name
    with pytest.raises(QSMInputError, match="--use-fsl never"):
        MASKING.resolve("bet")
    monkeypatch.setattr(fsl, "USE_FSL", "auto")
    monkeypatch.delenv("FSLDIR")
    assert MASKING.resolve("auto") == mask_name
    assert UNWRAPPING.resolve("auto") == unwrap_name
    fsl.configure(use_fsl="always")
    try:
        with pytest.raises(fsl.FSLNotFoundError, match="FSLDIR is not set"):
            MASKING.resolve("auto")
        fsl.configure(fsl_dir=str(fake_fsl))  # --fsl-dir without $FSLDIR
        assert MASKING.resolve(None) == "bet"
        assert UNWRAPPING.resolve("auto") == "prelude"
    finally:
        fsl.configure(use_fsl="auto")
        fsl.FSL_DIR = None
    with pytest.raises(QSMInputError, match="--use-fsl"):
        fsl.configure(use_fsl="sometimes")


def test_auto_rule_installation_is_idempotent(fake_fsl, monkeypatch):
    mask_name = _embedded(monkeypatch)[0]
    fsl._install_auto_rules()  # what a module reload runs again
    assert "bet" in MASKING.names() and "prelude" in UNWRAPPING.names()
    assert MASKING.resolve("auto") == "bet"
    fsl.USE_FSL = "never"
    try:
        assert MASKING.resolve("auto") == mask_name  # the embedded fallback was not lost
    finally:
        fsl.USE_FSL = "auto"


# ----------------------------------------------------------------------------- BET


def test_run_bet_command_line_and_grid(fake_fsl):
    mag = _head()
    mask = fsl.run_bet(mag, OBLIQUE, f=0.4, g=0.1)
    (call,) = _calls(fake_fsl)
    argv = call["argv"]
    tmp = os.path.dirname(argv[1])
    assert argv == [str(fake_fsl / "bin" / "bet"), os.path.join(tmp, "magnitude.nii.gz"),
                    os.path.join(tmp, "brain"), "-m", "-n", "-R", "-f", "0.4", "-g", "0.1"]
    assert not os.path.exists(tmp)  # temporary directory removed
    assert call["FSLDIR"] == str(fake_fsl) and call["FSLOUTPUTTYPE"] == "NIFTI_GZ"
    assert "FSLOUTPUTTYPE" not in os.environ  # the caller's environment is restored
    np.testing.assert_allclose(call["affine"], OBLIQUE, atol=1e-5)  # BET saw the real geometry
    assert call["shape"] == list(mag.shape)
    np.testing.assert_array_equal(mask, mag > 0.4 * mag.max())
    assert mask.dtype == bool and mask.shape == mag.shape


def test_run_bet_options_and_output_type(fake_fsl, monkeypatch):
    monkeypatch.setenv("FSLOUTPUTTYPE", "NIFTI")  # the user's choice is kept; .nii is read back
    mag = np.stack([_head(), 0.5 * _head()], axis=3)  # echoes: root-mean-square
    mask = fsl.run_bet(mag, (1.0, 1.2, 2.0), f=0.6, robust=False, extra={"t": True})
    (call,) = _calls(fake_fsl)
    assert call["argv"][3:] == ["-m", "-n", "-f", "0.6", "-g", "0.0", "-t"]
    assert call["FSLOUTPUTTYPE"] == "NIFTI" and os.environ["FSLOUTPUTTYPE"] == "NIFTI"
    np.testing.assert_allclose(call["affine"], np.diag([1.0, 1.2, 2.0, 1.0]))
    rms = np.sqrt(np.mean(mag.astype(np.float64) ** 2, axis=3))
    np.testing.assert_array_equal(mask, rms > 0.6 * rms.max())


def test_bet_stage_function_via_registry(fake_fsl):
    mag = _head()
    method = MASKING.get("auto")
    assert method.name == "bet"
    mask = method.func(mag, (1.0, 1.0, 1.0), f=0.5, erode=1.0)
    full = mag > 0.5 * mag.max()
    assert mask.sum() < full.sum() and np.all(full[mask])  # eroded inside BET's mask


def test_bet_failure_reports_stderr(fake_fsl, monkeypatch):
    monkeypatch.setenv("FAKE_FSL_FAIL", "bet")
    with pytest.raises(fsl.FSLToolError) as err:
        fsl.run_bet(_head(), (1.0, 1.0, 1.0))
    msg = str(err.value)
    assert "exit code 7" in msg and "simulated failure" in msg and "#22 :: bad input" in msg
    assert "\n" not in msg
    assert err.value.returncode == 7 and err.value.command[0] == str(fake_fsl / "bin" / "bet")
    assert "Image Exception" in err.value.stderr


def test_bet_output_off_grid_is_an_error(fake_fsl, monkeypatch):
    monkeypatch.setenv("FAKE_FSL_SHIFT", "1")
    with pytest.raises(fsl.FSLToolError, match="not on the input grid"):
        fsl.run_bet(_head(), (1.0, 1.0, 1.0))


def test_bet_bad_parameters(fake_fsl):
    with pytest.raises(QSMInputError, match="-f must be in 0..1"):
        fsl.run_bet(_head(), (1, 1, 1), f=1.5)
    with pytest.raises(QSMInputError, match="NaN"):
        fsl.run_bet(np.full((4, 4, 4), np.nan), (1, 1, 1))
    assert _calls(fake_fsl) == []  # nothing ran


# ----------------------------------------------------------------------------- PRELUDE


def _truth(shape=(16, 14, 10)):
    x, y, z = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    return 0.9 * x + 0.02 * (y - 7) ** 2 - 0.4 * z  # spans ~26 rad: many wraps


def test_run_prelude_command_line_and_result(fake_fsl):
    truth = _truth()
    np.save(fake_fsl / "truth.npy", truth)
    wrapped = np.angle(np.exp(1j * truth)).astype(np.float32)
    mag = np.full(truth.shape, 3.0, np.float32)
    mask = np.zeros(truth.shape, bool)
    mask[2:-2, 2:-2, 1:-1] = True
    out = fsl.run_prelude(wrapped, mag, mask, OBLIQUE)
    (call,) = _calls(fake_fsl)
    argv = call["argv"]
    tmp = os.path.dirname(argv[1].split("=", 1)[1])
    assert argv == [str(fake_fsl / "bin" / "prelude"),
                    "--abs=" + os.path.join(tmp, "magnitude.nii.gz"),
                    "--phase=" + os.path.join(tmp, "phase.nii.gz"),
                    "--mask=" + os.path.join(tmp, "mask.nii.gz"),
                    "--out=" + os.path.join(tmp, "unwrapped")]
    assert not os.path.exists(tmp)
    assert call["abs_max"] == 3.0 and call["mask_count"] == int(mask.sum())
    assert out.dtype == np.float32 and out.shape == truth.shape
    np.testing.assert_allclose(out, (truth * mask).astype(np.float32), atol=1e-5)


def test_prelude_stage_function_without_magnitude_or_mask(fake_fsl):
    truth = _truth((12, 10, 8))
    np.save(fake_fsl / "truth.npy", truth)
    method = UNWRAPPING.get("auto")
    assert method.name == "prelude"
    out = method.func(np.angle(np.exp(1j * truth)), voxel_size=(1.0, 1.0, 2.0))
    (call,) = _calls(fake_fsl)
    assert [a.split("=")[0] for a in call["argv"][1:]] == ["--abs", "--phase", "--out"]
    assert call["abs_max"] == 1.0 and call["mask_count"] == truth.size
    np.testing.assert_allclose(out, truth, atol=1e-5)


def test_prelude_failure_and_bad_input(fake_fsl, monkeypatch):
    truth = _truth((8, 8, 6))
    np.save(fake_fsl / "truth.npy", truth)
    with pytest.raises(QSMInputError, match="wrapped radians"):
        fsl.run_prelude(np.full((8, 8, 6), 3000.0), None, None)  # raw vendor phase
    with pytest.raises(fsl.FSLToolError, match="input phase is not the wrapped truth"):
        fsl.run_prelude(np.zeros((8, 8, 6)), None, None)  # the stand-in rejects it: stderr shown
    monkeypatch.setenv("FAKE_FSL_FAIL", "prelude")
    with pytest.raises(fsl.FSLToolError, match="prelude failed with exit code 7: prelude: ERROR"):
        fsl.run_prelude(np.angle(np.exp(1j * truth)), None, None)
