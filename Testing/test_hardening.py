"""Hardening (issue 19): the ten defects found by feeding qsmkit hostile inputs, each with a test
that failed before the fix, and one property-style test that feeds every command a family of
corrupted inputs and asserts exit 2, one line, nothing written and the inputs unchanged.

Everything runs in-process on a 32x32x16 phantom (7.5 x 7.5 x 10 mm voxels) so the module
stays within its time budget; tests of the output-writing paths replace the pipeline by a
fast stand-in where the numbers are not what is tested.
"""

import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qsmkit import batch, cli, geometry, io, pipeline, stats, units
from qsmkit.cli import main
from qsmkit.errors import QSMInputError, QSMWarning

SMALL = ["--shape", "32", "32", "16", "--voxel-size", "7.5", "7.5", "10"]
FAST = ["--unwrapping", "laplacian", "--background", "vsharp", "--inversion", "tkd"]


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim19")
    assert main(["simulate", "--out", str(out), *SMALL, "--quiet"]) == 0
    return out


def _save(path, data, affine=None, sidecar=None):
    affine = np.diag([7.5, 7.5, 10.0, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    if sidecar is not None:
        Path(io.sidecar_path(path)).write_text(json.dumps(sidecar))
    return str(path)


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qsmkit: error:"), err
    return err[0]


def _tree(folder):
    """Every file under ``folder`` (hidden ones included) with its content hash."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ 1. batch

def _bids(root, n=3, touch_only=True, sim=None):
    for i in range(1, n + 1):
        anat = root / f"sub-0{i}" / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        for part, src in (("mag", "magnitude"), ("phase", "phase")):
            dst = anat / f"sub-0{i}_part-{part}_GRE.nii.gz"
            if touch_only:
                dst.touch()
            else:
                shutil.copy(sim / f"{src}.nii.gz", dst)
            (anat / f"sub-0{i}_part-{part}_GRE.json").write_text(
                json.dumps({"EchoTime": 0.02, "MagneticFieldStrength": 3.0}))
    return root


def test_batch_malformed_names_are_reported_and_skipped(tmp_path):
    root = _bids(tmp_path, n=2)
    (root / "sub-02" / "anat" / "sub-02_echo-x_part-mag_GRE.nii.gz").touch()
    (root / "sub-01" / "anat" / "run-1_part-mag_GRE.nii.gz").touch()
    (root / "sub-01" / "anat" / "sub-01_part-real_GRE.nii.gz").touch()
    problems = []
    subjects = batch.find_subjects(root, problems=problems)
    assert [s.key for s in subjects] == ["sub-01", "sub-02"]
    reasons = {Path(p).name: r for p, r in problems}
    assert "echo-x is not a positive echo number" in reasons["sub-02_echo-x_part-mag_GRE.nii.gz"]
    assert "no sub-<label>" in reasons["run-1_part-mag_GRE.nii.gz"]
    assert "part-real is not supported" in reasons["sub-01_part-real_GRE.nii.gz"]
    assert all(len(s.magnitude) == 1 for s in subjects)  # the bad files joined no subject


def test_batch_killed_worker_fails_only_its_subject(tmp_path):
    """A subject whose worker process dies (here SIGKILL, as the kernel's OOM killer does) is
    reported failed with its reason; the other subjects finish; the summary is written."""
    pytest.importorskip("dask.distributed")
    root = _bids(tmp_path / "bids", n=3)

    def task(subject, out_root, config, reference):
        if subject.key == "sub-02":
            os.kill(os.getpid(), signal.SIGKILL)
        return {"subject": subject.key, "status": "ok", "seconds": 0.0}

    summary = batch.run_batch(root, tmp_path / "out", config={"masking": "threshold"},
                              workers=1, progress=False, task=task)
    assert summary["done"] == ["sub-01", "sub-03"] and summary["failed"] == ["sub-02"]
    assert "worker process died" in summary["errors"]["sub-02"]
    written = json.loads((tmp_path / "out" / "batch_summary.json").read_text())
    assert written["failed"] == ["sub-02"] and written["done"] == ["sub-01", "sub-03"]


def test_batch_summary_written_when_interrupted(tmp_path, monkeypatch):
    root = _bids(tmp_path / "bids", n=2)
    (root / "sub-01" / "anat" / "sub-01_echo-x_part-mag_GRE.nii.gz").touch()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(batch, "make_client", interrupted)
    with pytest.raises(KeyboardInterrupt), pytest.warns(QSMWarning, match="echo-x"):
        batch.run_batch(root, tmp_path / "out", config={}, progress=False)
    summary = json.loads((tmp_path / "out" / "batch_summary.json").read_text())
    assert summary["interrupted"].startswith("KeyboardInterrupt")
    assert summary["not_run"] == ["sub-01", "sub-02"]
    assert list(summary["bad_names"].values()) == ["echo-x is not a positive echo number"]


# ------------------------------------------------------------------ 2. header size

def _fake_header(path, shape, dtype=np.float32, payload=b"\0" * 8, gz=True):
    """A NIfTI whose header claims ``shape`` but which holds only ``payload`` after it."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(shape)
    hdr.set_qform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    hdr["vox_offset"] = 352
    blob = hdr.binaryblock + b"\0" * 4 + payload
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(blob)
    else:
        Path(path).write_bytes(blob)
    return str(path)


@pytest.mark.parametrize("name, gz", [("big.nii.gz", True), ("big.nii", False)])
def test_header_claim_larger_than_file_is_refused_before_reading(tmp_path, capsys, name, gz):
    path = _fake_header(tmp_path / name, (800, 800, 800), gz=gz)
    assert os.path.getsize(path) < 500
    tracemalloc.start()
    with pytest.raises(QSMInputError, match="truncated file or corrupt header") as err:
        io.load_volume(path, what="magnitude")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert str(err.value).startswith(path) and "2.05 GB" in str(err.value)
    assert peak < 50e6  # nothing of the claimed 2 GB was allocated
    assert main(["mask", "--magnitude", path, "--out", str(tmp_path / "m.nii.gz")]) == 2
    assert path in _one_error_line(capsys)


def test_header_claim_above_ceiling_is_refused(tmp_path, capsys, monkeypatch):
    huge = _fake_header(tmp_path / "huge.nii.gz", (5000, 5000, 5000))
    with pytest.raises(QSMInputError, match="above the ceiling .* QSMKIT_MAX_IMAGE_GB"):
        io.load_volume(huge)
    ok = _save(tmp_path / "ok.nii.gz", np.ones((20, 20, 20), np.float32))  # 32 kB of voxels
    assert io.load_volume(ok).data.shape == (20, 20, 20)
    monkeypatch.setenv("QSMKIT_MAX_IMAGE_GB", "0.00001")  # 10 kB
    assert main(["mask", "--magnitude", ok, "--out", str(tmp_path / "m.nii.gz")]) == 2
    line = _one_error_line(capsys)
    assert ok in line and "32,000 bytes" in line and "10,000 bytes" in line
    monkeypatch.setenv("QSMKIT_MAX_IMAGE_GB", "lots")
    with pytest.raises(QSMInputError, match="must be a positive number"):
        io.load_volume(ok)


def test_gzip_guard_accepts_real_data_without_a_matching_trailer(tmp_path):
    """A two-member gzip (its trailer gives the second member's size only) holds the data: the
    bounded read counts them and the file loads; cut short, it is refused."""
    data = np.arange(40 * 30 * 20, dtype=np.float32).reshape(40, 30, 20)
    plain = _save(tmp_path / "a.nii", data)
    raw = Path(plain).read_bytes()
    two = tmp_path / "two.nii.gz"
    two.write_bytes(gzip.compress(raw[:10000]) + gzip.compress(raw[10000:]))
    np.testing.assert_array_equal(io.load_volume(str(two)).data, data)
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(gzip.compress(raw)[:20000])
    with pytest.raises(QSMInputError, match="truncated|damaged"):
        io.load_volume(str(cut))


@pytest.mark.parametrize("encoding", ["raw", "gzip"])
def test_nrrd_header_claim_is_checked(tmp_path, encoding):
    body = b"\0" * 64 if encoding == "raw" else gzip.compress(b"\0" * 64)
    head = (f"NRRD0004\ntype: float\ndimension: 3\nsizes: 800 800 800\nencoding: {encoding}\n"
            "space directions: (1,0,0) (0,1,0) (0,0,1)\nspace origin: (0,0,0)\n\n").encode()
    path = tmp_path / f"big_{encoding}.nrrd"
    path.write_bytes(head + body)
    with pytest.raises(QSMInputError, match="corrupt header"):
        io.load_volume(str(path))
    # a real NRRD written by SimpleITK still loads
    good = io.save_volume(str(tmp_path / "good.nrrd"), np.ones((5, 6, 7), np.float32), np.eye(4))
    assert io.load_volume(good).data.shape == (5, 6, 7)


# ------------------------------------------------------------------ 3. interruption

def _old_set(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_text("old " + n)
    return _tree(folder)


def test_output_set_is_all_new_or_all_old(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    before = _old_set(folder, ["a.nii.gz", "a.json", "b.nii.gz"])
    with pytest.raises(KeyboardInterrupt):  # interrupted while writing: all old
        with io.OutputSet() as outset:
            Path(outset.path(folder / "a.nii.gz")).write_text("new a")
            raise KeyboardInterrupt
    assert _tree(folder) == before
    real_replace = os.replace
    calls = []

    def failing(src, dst):  # the third move fails: the two before it are undone
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", failing)
    with pytest.raises(QSMInputError, match="old files are kept"):
        with io.OutputSet() as outset:
            for n in ("a.nii.gz", "b.nii.gz"):
                Path(outset.path(folder / n)).write_text("new " + n)
    monkeypatch.setattr(io.os, "replace", real_replace)
    assert _tree(folder) == before
    with io.OutputSet() as outset:  # and a commit that completes: all new
        for n in ("a.nii.gz", "b.nii.gz"):
            Path(outset.path(folder / n)).write_text("new " + n)
    assert (folder / "a.nii.gz").read_text() == "new a.nii.gz"
    assert (folder / "b.nii.gz").read_text() == "new b.nii.gz"
    assert (folder / "a.json").read_text() == "old a.json"
    assert not [p for p in os.listdir(folder) if p.startswith(".tmp")]


def test_signal_during_commit_waits_for_the_whole_set(tmp_path, monkeypatch):
    # Python's own SIGINT handler, whatever an earlier test or library left installed (a
    # SIG_IGN inherited that way made this test fail in some orders of the whole suite)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _commit_interrupted_between_moves(tmp_path, monkeypatch)
    finally:
        signal.signal(signal.SIGINT, previous)


def _commit_interrupted_between_moves(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    _old_set(folder, ["a.txt", "b.txt"])
    real_replace = os.replace

    def interrupting(src, dst):
        real_replace(src, dst)
        if dst.endswith("a.txt"):
            os.kill(os.getpid(), signal.SIGINT)  # arrives between the two moves

    monkeypatch.setattr(io.os, "replace", interrupting)
    with pytest.raises(KeyboardInterrupt):
        with io.OutputSet() as outset:
            for n in ("a.txt", "b.txt"):
                Path(outset.path(folder / n)).write_text("new")
    assert (folder / "a.txt").read_text() == "new" and (folder / "b.txt").read_text() == "new"


def _fake_pipeline(mag, pha, te, b0, vs, b0_dir, mask=None, config=None, progress=None,
                   reference_region=None):
    from qsmkit.pipeline import PipelineResult

    m = np.ones(mag.shape[:3], bool) if mask is None else mask
    z = np.zeros(mag.shape[:3], np.float32)
    return PipelineResult(m, z, z, m, z, config, [], None, {"how": "none", "requested": "none"})


@pytest.mark.parametrize("sig, code", [(None, 130), (signal.SIGTERM, 143)])
def test_run_interrupted_while_writing_leaves_old_set(sim, tmp_path, capsys, monkeypatch,
                                                      sig, code):
    out = tmp_path / "recon"
    before = _old_set(out, ["mask.nii.gz", "chi.nii.gz", "chi.json"])
    monkeypatch.setattr(pipeline, "run_pipeline", _fake_pipeline)  # what qsmkit run calls
    real_save, count = io.save_volume, []

    def save(path, *a, **k):
        count.append(path)
        if len(count) == 3:
            if sig is None:
                raise KeyboardInterrupt
            os.kill(os.getpid(), sig)
        return real_save(path, *a, **k)

    monkeypatch.setattr(io, "save_volume", save)
    assert main(["run", "--magnitude", str(sim / "magnitude.nii.gz"), "--phase",
                 str(sim / "phase.nii.gz"), "--out", str(out), "--quiet"]) == code
    assert _tree(out) == before  # not a new mask beside an old chi, no .tmp-* left
    err = capsys.readouterr().err
    assert "outputs left as they were" in err and len(err.strip().splitlines()) == 1
    assert signal.getsignal(signal.SIGTERM) is not cli._on_sigterm  # handler restored


def test_stale_temporary_files_of_dead_runs_are_removed(sim, tmp_path, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "m"
    out.mkdir()
    host = io._host()
    stale_file = out / f".tmp-qsmkit-{host}-{dead.pid}-abcdefgh-mask.nii.gz"
    stale_dir = out / f".tmp-qsmkit-{host}-{dead.pid}-ijklmnop"
    live = out / f".tmp-qsmkit-{host}-{os.getpid()}-qrstuvwx-x.nii.gz"
    stale_file.write_text("x")
    stale_dir.mkdir()
    live.write_text("x")
    monkeypatch.setattr(io, "_cleaned", set())
    assert main(["mask", "--magnitude", str(sim / "magnitude.nii.gz"), "--out",
                 str(out / "mask.nii.gz"), "--method", "threshold", "--quiet"]) == 0
    assert not stale_file.exists() and not stale_dir.exists()
    assert live.exists()  # this process is alive: its files are not touched
    assert sorted(os.listdir(out)) == sorted(["mask.nii.gz", "mask.json", live.name])


# ------------------------------------------------------------------ 4. sidecars

def test_outputs_never_overwrite_an_input_sidecar(sim, tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    for n in ("phase.nii.gz", "phase.json", "magnitude.nii.gz", "magnitude.json"):
        shutil.copy(sim / n, d / n)
    before = _tree(d)
    assert main(["unwrap", "--phase", str(d / "phase.nii.gz"), "--out", str(d / "phase.nii")]) == 2
    assert "JSON sidecar" in _one_error_line(capsys)
    assert main(["mask", "--magnitude", str(d / "magnitude.nii.gz"), "--out",
                 str(d / "magnitude.nii")]) == 2
    assert "sidecar of input" in _one_error_line(capsys)
    r = tmp_path / "r"
    r.mkdir()
    shutil.copy(sim / "chi_true.nii.gz", r / "chi.nii.gz")
    shutil.copy(sim / "chi_true.json", r / "chi.json")
    shutil.copy(sim / "labels.nii.gz", r / "labels.nii.gz")
    r_before = _tree(r)
    assert main(["stats", "--chi", str(r / "chi.nii.gz"), "--labels", str(r / "labels.nii.gz"),
                 "--out", str(r / "chi.csv")]) == 2
    assert "chi.json" in _one_error_line(capsys)
    assert _tree(d) == before and _tree(r) == r_before
    # two outputs whose sidecars coincide are refused too
    assert main(["combine", "--magnitude", str(sim / "magnitude.nii.gz"), "--phase",
                 str(sim / "phase.nii.gz"), "--out-magnitude", str(tmp_path / "x.nii.gz"),
                 "--out-phase", str(tmp_path / "x.nii")]) == 2
    capsys.readouterr()


# ------------------------------------------------------------------ 5. units

@pytest.mark.parametrize("flag, value, expect", [
    ("--te", "20", "did you mean 20 ms = 0.02 s"),
    ("--te", "1e-9", "below 0.1 ms"),
    ("--b0", "3000", "did you mean 3000 mT = 3 T"),
    ("--b0", "127.7e6", "Larmor frequency 127.7 MHz = 3 T"),
    ("--b0", "0.001", "below 0.01 T"),
])
def test_implausible_te_and_b0_are_refused(sim, tmp_path, capsys, flag, value, expect):
    other = {"--te": ["--b0", "3"], "--b0": ["--te", "0.02"]}[flag]
    assert main(["run", "--magnitude", str(sim / "magnitude.nii.gz"), "--phase",
                 str(sim / "phase.nii.gz"), flag, value, *other, "--out",
                 str(tmp_path / "r")]) == 2
    assert expect in _one_error_line(capsys)
    assert not (tmp_path / "r").exists()


def test_unusual_te_b0_warn_and_sidecar_te_in_ms_is_refused(sim, tmp_path):
    with pytest.warns(QSMWarning, match="outside the usual"):
        assert units.check_te([0.25]) == [0.25]
    with pytest.warns(QSMWarning, match="outside the usual"):
        assert units.check_b0(14.1) == 14.1
    d = tmp_path / "d"
    d.mkdir()
    shutil.copy(sim / "magnitude.nii.gz", d / "m.nii.gz")
    shutil.copy(sim / "phase.nii.gz", d / "p.nii.gz")
    (d / "p.json").write_text(json.dumps({"EchoTime": 20, "MagneticFieldStrength": 3}))
    with pytest.raises(QSMInputError, match=r"p.nii.gz: EchoTime .* did you mean 20 ms"):
        io.load_gre([str(d / "m.nii.gz")], [str(d / "p.nii.gz")])


# ------------------------------------------------------------------ 6. integer phase

def test_integer_phase_without_sidecar_needs_the_scale(sim, tmp_path, capsys):
    """Siemens-scale int16 phase spanning only -1633..2774 is refused without --phase-scale
    (dividing by its own maximum made the field 4096/2774 = 1.476x too large); with it, the
    scaling is x / 4096 * pi and the sidecar records it."""
    rng = np.random.default_rng(0)
    raw = rng.integers(-1633, 2775, size=(32, 32, 16)).astype(np.int16)
    raw.flat[:2] = (-1633, 2774)
    p = _save(tmp_path / "p.nii.gz", raw)
    with pytest.raises(QSMInputError, match="--phase-scale"):
        units.rescale_phase(raw)
    assert main(["unwrap", "--phase", p, "--out", str(tmp_path / "u.nii.gz"), "--quiet"]) == 2
    assert "reaches no known vendor scale" in _one_error_line(capsys)
    info = {}
    rad = units.rescale_phase(raw, scale=4096, info=info)
    np.testing.assert_allclose(rad, raw / 4096 * np.pi, atol=1e-6)
    assert info["pi_value"] == 4096 and info["rule"].startswith("given")
    assert main(["unwrap", "--phase", p, "--phase-scale", "4096", "--method", "laplacian",
                 "--out", str(tmp_path / "u.nii.gz"), "--quiet"]) == 0
    side = json.loads((tmp_path / "u.json").read_text())
    assert side["phase_scaling"]["pi_value"] == 4096
    # phase that reaches the full scale still needs nothing; values beyond the scale are refused
    full = raw.copy()
    full.flat[:2] = (-4096, 4094)
    np.testing.assert_allclose(units.rescale_phase(full), full / 4096 * np.pi, atol=1e-6)
    with pytest.raises(QSMInputError, match="exceed the range"):
        units.rescale_phase(full, scale=2048)


# ------------------------------------------------------------------ 7. labels

def test_label_maps_non_integer_nan_and_absurd_counts_are_refused(sim, tmp_path, capsys):
    img = nib.load(str(sim / "labels.nii.gz"))
    labels, affine = img.get_fdata(), img.affine
    chi = str(sim / "chi_true.nii.gz")
    cases = {"half": (labels * 0.5, "voxels with non-integer values (e.g. "),
             "nan": (np.where(labels == 1, np.nan, labels), "NaN/Inf voxels")}
    rng = np.random.default_rng(1)
    cases["intensity"] = (rng.integers(1, 30000, labels.shape).astype(np.int16),
                          "distinct labels, more than 2000")
    for name, (data, expect) in cases.items():
        path = _save(tmp_path / f"{name}_labels.nii.gz", data.astype(np.float32)
                     if name != "intensity" else data, affine)
        assert main(["stats", "--chi", chi, "--labels", path, "--out",
                     str(tmp_path / f"{name}.csv")]) == 2
        assert expect in _one_error_line(capsys), name
        assert not (tmp_path / f"{name}.csv").exists()


def test_label_statistics_one_pass_equal_per_mask_and_small_memory():
    rng = np.random.default_rng(2)
    shape = (48, 48, 48)
    chi = rng.normal(size=shape)
    labels = rng.integers(0, 300, size=shape)
    tracemalloc.start()
    rows = stats.roi_table(chi, labels, (1.0, 1.0, 1.0), reference=7)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(rows) == 299
    ref = chi[labels == 7].mean()
    for r in rows[::37]:
        v = chi[labels == r["label"]]
        q1, med, q3 = np.percentile(v, [25, 50, 75])
        np.testing.assert_allclose([r["voxels"], r["mean"], r["sd"], r["median"], r["iqr"],
                                    r["min"], r["max"], r["mean_ref"]],
                                   [v.size, v.mean(), v.std(ddof=1), med, q3 - q1, v.min(),
                                    v.max(), v.mean() - ref], rtol=1e-12, atol=1e-12)
    # one bool mask per label would alone take 299 x 110592 bytes = 33 MB
    assert peak < 12 * chi.nbytes < 299 * chi.size


def test_label_erosion_in_one_pass_equals_per_region_erosion():
    from qsmkit.masking import erode_mm

    rng = np.random.default_rng(3)
    labels = np.zeros((30, 30, 20), np.int64)
    for lab in range(1, 6):
        c = rng.integers(5, 25, 3)
        labels[c[0] - 5:c[0] + 4, c[1] - 4:c[1] + 5, max(c[2] - 6, 0):c[2] + 3] = lab
    eroded = stats._erode_labels(labels, (1.0, 1.2, 1.5), 2.0)
    for lab in range(1, 6):
        np.testing.assert_array_equal(eroded == lab, erode_mm(labels == lab, (1.0, 1.2, 1.5), 2.0))


# ------------------------------------------------------------------ 8. parameters and names

@pytest.mark.parametrize("argv, expect", [
    (["--masking-param", "erode=abc"], "--masking-param erode=abc"),
    (["--background-param", "tsvd=abc"], "--background-param tsvd=abc"),
    (["--inversion-param", "threshold=nan"], "threshold=nan"),
    (["--field-param", "method=3"], "expects text"),
    (["--background-param", "weights=1"], "set by qsmkit itself"),
    (["--unwrapping-param", "bogus=1"], "unknown parameter"),
])
def test_every_param_value_is_checked(sim, tmp_path, capsys, argv, expect):
    assert main(["run", "--magnitude", str(sim / "magnitude.nii.gz"), "--phase",
                 str(sim / "phase.nii.gz"), "--out", str(tmp_path / "r"), *FAST, *argv]) == 2
    assert expect in _one_error_line(capsys)
    assert not (tmp_path / "r").exists()


def test_mask_param_and_label_names_errors(sim, tmp_path, capsys):
    assert main(["mask", "--magnitude", str(sim / "magnitude.nii.gz"), "--param", "erode=abc",
                 "--out", str(tmp_path / "m.nii.gz")]) == 2
    assert "erode=abc" in _one_error_line(capsys)
    chi, labels = str(sim / "chi_true.nii.gz"), str(sim / "labels.nii.gz")
    bad = {"bom": b"\xff\xfe\x00", "latin1": "1 caf\xe9\n".encode("latin-1"),
           "superscript": "\u00b2 x\n".encode(), "dup": b"1 a\n1 b\n"}
    expect = {"bom": "not utf-16 text", "latin1": "byte 0xe9 at offset 5",
              "superscript": "line 1: label id '\u00b2' is not an integer",
              "dup": "line 2: label 1 is named twice"}
    for name, blob in bad.items():
        (tmp_path / f"{name}.txt").write_bytes(blob)
        assert main(["stats", "--chi", chi, "--labels", labels, "--label-names",
                     str(tmp_path / f"{name}.txt"), "--out", str(tmp_path / f"{name}.csv")]) == 2
        assert expect[name] in _one_error_line(capsys), name
    # a UTF-16 table with its byte-order mark (as Windows tools save them) is read
    (tmp_path / "u16.tsv").write_bytes("index\tname\n1\tcsf\n2\tcaudate\n".encode("utf-16"))
    assert stats.read_label_names(tmp_path / "u16.tsv") == {1: "csf", 2: "caudate"}


# ------------------------------------------------------------------ 9. NaN outside the mask

@pytest.fixture(scope="module")
def nan_outside(sim, tmp_path_factory):
    d = tmp_path_factory.mktemp("nan19")
    mask = nib.load(str(sim / "mask_true.nii.gz")).get_fdata() > 0
    for name in ("magnitude", "phase"):
        img = nib.load(str(sim / f"{name}.nii.gz"))
        data = np.asarray(img.get_fdata(), np.float32)
        data[~mask] = np.nan
        nib.save(nib.Nifti1Image(data, img.affine), str(d / f"{name}.nii.gz"))
        shutil.copy(sim / f"{name}.json", d / f"{name}.json")
    return d, mask


def test_run_and_field_accept_nan_outside_the_mask(sim, nan_outside, tmp_path, capsys):
    d, mask = nan_outside
    ins = ["--magnitude", str(d / "magnitude.nii.gz"), "--phase", str(d / "phase.nii.gz")]
    assert main(["run", *ins, "--out", str(tmp_path / "r"), *FAST, "--quiet"]) == 2
    assert "NaN" in _one_error_line(capsys)  # without a mask they are refused, as documented
    k = ["--mask", str(sim / "mask_true.nii.gz")]
    assert main(["run", *ins, *k, "--out", str(tmp_path / "r"), *FAST, "--quiet"]) == 0
    chi = nib.load(str(tmp_path / "r" / "chi.nii.gz")).get_fdata()
    assert np.all(np.isfinite(chi)) and np.any(chi[mask] != 0)
    assert main(["field", *ins, *k, "--unwrapping", "laplacian", "--out",
                 str(tmp_path / "f"), "--quiet"]) == 0
    field = nib.load(str(tmp_path / "f_ppm.nii.gz")).get_fdata()
    assert np.all(np.isfinite(field[mask]))
    # NaN inside the mask stays an error, with the count
    bigger = tmp_path / "all.nii.gz"
    _save(bigger, np.ones(mask.shape, np.uint8), nib.load(str(sim / "mask_true.nii.gz")).affine)
    assert main(["field", *ins, "--mask", str(bigger), "--out", str(tmp_path / "g"),
                 "--quiet"]) == 2
    assert f"magnitude has {int((~mask).sum())} NaN/Inf voxels inside the mask" in \
        _one_error_line(capsys)


def test_every_command_with_a_mask_accepts_nan_outside_it(sim, nan_outside, tmp_path):
    """The README's rule holds beyond run and field: unwrap, background (--weights) and invert
    (--magnitude) accept NaN outside their --mask too."""
    d, mask = nan_outside
    k = ["--mask", str(sim / "mask_true.nii.gz"), "--quiet"]
    assert main(["unwrap", "--phase", str(d / "phase.nii.gz"), "--magnitude",
                 str(d / "magnitude.nii.gz"), "--method", "laplacian", "--out",
                 str(tmp_path / "u.nii.gz"), *k]) == 0
    assert np.all(np.isfinite(nib.load(str(tmp_path / "u.nii.gz")).get_fdata()))
    assert main(["background", "--field", str(sim / "field_total_true.nii.gz"), "--weights",
                 str(d / "magnitude.nii.gz"), "--method", "vsharp", "--out",
                 str(tmp_path / "l.nii.gz"), *k]) == 0
    assert main(["invert", "--field", str(sim / "field_local_true.nii.gz"), "--magnitude",
                 str(d / "magnitude.nii.gz"), "--method", "tkd", "--out",
                 str(tmp_path / "c.nii.gz"), *k]) == 0
    assert np.all(np.isfinite(nib.load(str(tmp_path / "c.nii.gz")).get_fdata()))


# ------------------------------------------------------------------ 10. shear

def test_sheared_affines_are_refused_oblique_ones_accepted(tmp_path, capsys):
    data = np.ones((8, 8, 8), np.float32)
    shear = np.eye(4)
    shear[0, 2] = np.tan(np.radians(5))  # the third axis tilted 5 degrees towards x
    path = _save(tmp_path / "sheared.nii.gz", data, shear)
    with pytest.raises(QSMInputError, match="sheared voxel axes .* 85.00 degrees"):
        io.load_volume(path)
    assert main(["invert", "--field", path, "--mask", path, "--out",
                 str(tmp_path / "c.nii.gz")]) == 2
    assert "tolerance 0.5 degrees" in _one_error_line(capsys)
    oblique = geometry.make_affine((1, 1, 2), geometry.rotation_matrix(0, 20))
    assert io.load_volume(_save(tmp_path / "oblique.nii.gz", data, oblique)).data.shape == (8,) * 3
    tiny = np.eye(4)
    tiny[0, 2] = np.tan(np.radians(0.2))
    assert io.load_volume(_save(tmp_path / "tiny.nii.gz", data, tiny)).data.shape == (8,) * 3
    assert io.load_volume(path, allow_shear=True).data.shape == (8,) * 3  # stats may resample


# ------------------------------------------------------------------ property test

def _corrupt(kind, src, dst):
    """Write a corrupted copy of NIfTI ``src`` to ``dst``."""
    img = nib.load(str(src))
    data = np.asarray(img.dataobj)
    if kind == "truncated":
        blob = Path(src).read_bytes()
        Path(dst).write_bytes(blob[: len(blob) // 2])
    elif kind == "oversized header":
        _fake_header(dst, data.shape[:3] + (400,), payload=b"\0" * 64)
    elif kind == "wrong dtype":
        nib.save(nib.Nifti1Image(data.astype(np.complex64) * 1j, img.affine), str(dst))
    elif kind == "NaN":
        bad = data.astype(np.float32)
        c = tuple(n // 2 for n in bad.shape[:3])
        bad[c] = np.nan  # the centre: inside any brain mask
        nib.save(nib.Nifti1Image(bad, img.affine), str(dst))
    elif kind == "wrong geometry":
        nib.save(nib.Nifti1Image(data[:-1], img.affine), str(dst))
    elif kind == "sheared":
        a = img.affine.copy()
        a[0, 2] += 0.2 * a[2, 2]
        nib.save(nib.Nifti1Image(data, a), str(dst))
    return str(dst)


CORRUPTIONS = ("truncated", "oversized header", "wrong dtype", "NaN", "wrong geometry", "sheared")

# command -> (argv template, the inputs that are corrupted in turn)
COMMANDS = {
    "run": (["run", "--magnitude", "{magnitude}", "--phase", "{phase}", "--mask", "{mask}",
             "--out", "{out}/r", *FAST], ("magnitude", "phase", "mask")),
    "field": (["field", "--magnitude", "{magnitude}", "--phase", "{phase}", "--mask", "{mask}",
               "--out", "{out}/f"], ("magnitude", "phase", "mask")),
    "mask": (["mask", "--magnitude", "{magnitude}", "--out", "{out}/m.nii.gz"], ("magnitude",)),
    "unwrap": (["unwrap", "--phase", "{phase}", "--magnitude", "{magnitude}", "--mask", "{mask}",
                "--out", "{out}/u.nii.gz"], ("phase", "magnitude", "mask")),
    "background": (["background", "--field", "{field}", "--mask", "{mask}", "--out",
                    "{out}/l.nii.gz"], ("field", "mask")),
    "invert": (["invert", "--field", "{local}", "--mask", "{mask}", "--magnitude", "{magnitude}",
                "--out", "{out}/c.nii.gz"], ("local", "mask", "magnitude")),
    "combine": (["combine", "--magnitude", "{coil_mag}", "--phase", "{coil_phase}",
                 "--out-magnitude", "{out}/cm.nii.gz", "--out-phase", "{out}/cp.nii.gz"],
                ("coil_mag", "coil_phase")),
    "stats": (["stats", "--chi", "{chi}", "--labels", "{labels}", "--out", "{out}/s.csv"],
              ("chi", "labels")),
}
FILES = {"magnitude": "magnitude.nii.gz", "phase": "phase.nii.gz", "mask": "mask_true.nii.gz",
         "field": "field_total_true.nii.gz", "local": "field_local_true.nii.gz",
         "chi": "chi_true.nii.gz", "labels": "labels.nii.gz"}


def _skip(kind, command, role):
    """Corruptions that are not errors for that input: complex channel images are a valid
    combine input; labels and the chi map of stats may be sheared (no dipole kernel there,
    labels are resampled); the one input of mask has no other grid to disagree with."""
    return ((kind == "wrong dtype" and role == "coil_mag")
            or (kind == "sheared" and role in ("chi", "labels"))
            or (kind == "wrong geometry" and command == "mask"))


def test_every_command_refuses_every_corruption(sim, tmp_path, capsys):
    """8 commands x their inputs x 6 corruptions (truncated, oversized header, wrong dtype, NaN,
    wrong geometry, sheared): exit 2, one line, nothing written, inputs unchanged."""
    good = tmp_path / "good"
    good.mkdir()
    for role, name in FILES.items():
        shutil.copy(sim / name, good / f"{role}.nii.gz")
        shutil.copy(sim / name.replace(".nii.gz", ".json"), good / f"{role}.json")
    mag = nib.load(str(sim / "magnitude.nii.gz"))
    rng = np.random.default_rng(4)
    coil = np.stack([np.asarray(mag.dataobj) * (0.5 + rng.random()) for _ in range(3)], axis=-1)
    nib.save(nib.Nifti1Image(coil.astype(np.float32), mag.affine), str(good / "coil_mag.nii.gz"))
    ph = np.asarray(nib.load(str(sim / "phase.nii.gz")).dataobj)
    nib.save(nib.Nifti1Image(np.repeat(ph[..., None], 3, -1).astype(np.float32), mag.affine),
             str(good / "coil_phase.nii.gz"))
    inputs_before = _tree(good)
    bad = tmp_path / "bad"
    bad.mkdir()
    cases = 0
    for command, (template, roles) in COMMANDS.items():
        for role in roles:
            for kind in CORRUPTIONS:
                if _skip(kind, command, role):
                    continue
                paths = {r: str(good / f"{r}.nii.gz") for r in (*FILES, "coil_mag", "coil_phase")}
                paths[role] = _corrupt(kind, good / f"{role}.nii.gz",
                                       bad / f"{command}-{role}-{kind.replace(' ', '_')}.nii.gz")
                out = tmp_path / f"out-{cases}"
                argv = [a.format(out=out, **paths) for a in template] + ["--quiet"]
                code = main(argv)
                err = capsys.readouterr().err.strip().splitlines()
                label = f"{command} {role} {kind}"
                assert code == 2, (label, err)
                assert len(err) == 1 and err[0].startswith("qsmkit: error:"), (label, err)
                assert not out.exists() or _tree(out) == {}, (label, _tree(out))
                cases += 1
    assert _tree(good) == inputs_before
    assert cases == 110  # the README quotes this count


# ------------------------------------------------------------------ beyond the list

def test_other_options_and_files_give_one_line(sim, tmp_path, capsys):
    """The same classes elsewhere: a phantom larger than the memory ceiling, a negative
    erosion, a cohort table that is not UTF-8, a segmentation whose header claims too much."""
    cases = [
        (["simulate", "--out", str(tmp_path / "s"), "--shape", "100000", "100000", "100000"],
         "the requested phantom needs"),
        (["mask", "--magnitude", str(sim / "magnitude.nii.gz"), "--erode", "-1", "--out",
          str(tmp_path / "m.nii.gz")], "--erode must be zero or positive"),
    ]
    table = tmp_path / "cohort.csv"
    table.write_bytes(b"subject,label\n\xff\xfe\n")
    cases.append((["stats", "--chi", str(sim / "chi_true.nii.gz"), "--labels",
                   str(sim / "labels.nii.gz"), "--out", str(table), "--append"],
                  "not readable UTF-8"))
    seg = tmp_path / "big.seg.nrrd"
    seg.write_bytes(b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 900 900 900\nencoding: gzip\n\n"
                    + gzip.compress(b"\0" * 16))
    cases.append((["stats", "--chi", str(sim / "chi_true.nii.gz"), "--labels", str(seg),
                   "--out", str(tmp_path / "t.csv")], "truncated file or corrupt header"))
    bids = _bids(tmp_path / "bids", n=1)
    cases.append((["batch", str(bids), "--memory-limit", "lots", "--out", str(tmp_path / "d")],
                  "--memory-limit 'lots' is not a size"))
    for argv, expect in cases:
        assert main([*argv, "--quiet"]) == 2, argv
        assert expect in _one_error_line(capsys), argv
    assert sorted(os.listdir(tmp_path)) == ["bids", "big.seg.nrrd", "cohort.csv", "d"]
    assert json.loads((tmp_path / "d" / "batch_summary.json").read_text())["not_run"] == ["sub-01"]
