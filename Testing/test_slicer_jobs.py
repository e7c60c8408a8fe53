"""The QSM modules' Qt-free machinery (QSMExtension/QSM/QSMLib): the background ``qsmkit``
process (progress, log, cancel) and qsmkit commands on MRML nodes (slicer-core), whose outputs
must equal the ``qsmkit`` command line on the same data exactly.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from qsmkit import cli, io
from qsmkit import slicer_adapter as sa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "QSMExtension" / "QSM"))

from QSMLib import jobs  # noqa: E402
from QSMLib.process import QsmkitProcess, parse_progress, qsmkit_environment  # noqa: E402

# ---------------------------------------------------------------- progress and the process

def test_parse_progress_of_tqdm_lines():
    assert parse_progress("qsmkit run:   0%|          | 0/4 [00:00<?, ?stage/s]") == (0.0, None)
    assert parse_progress("qsmkit run:   0%|          | 0/4 [00:00<?, ?stage/s, mask]") == (0.0, "mask")
    assert parse_progress("qsmkit run:  50%|\u2588\u2588\u2588\u2588\u2588     | 2/4 "
                          "[00:00<00:00, 36.42stage/s, background]") == (0.5, "background")
    assert parse_progress("unwrap: 100%|##########| 3/3 [00:01<00:00,  2.1echo/s]") == (1.0, None)
    assert parse_progress("stage       method        seconds   peak MB") is None
    assert parse_progress("qsmkit: error: phase.nii.gz: missing echo time") is None


def python_script(tmp_path, code):
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(code))
    return [sys.executable, str(path)]


def test_process_output_progress_and_failure(tmp_path):
    argv = python_script(tmp_path, """
        import sys, time
        print("hello")
        for i in range(3):
            sys.stderr.write(f"\\rjob: {i * 50}%|#  | {i}/2 [00:00<00:00, 1.0it/s, step{i}]")
            sys.stderr.flush()
        sys.stderr.write("\\n")
        print("qsmkit: error: data.nii.gz: something is wrong", file=sys.stderr)
        sys.exit(2)
    """)
    seen = []
    proc = QsmkitProcess(argv, on_line=seen.append,
                         on_progress=lambda f, s: seen.append((f, s))).start()
    assert proc.wait(timeout=30) == 2
    assert proc.returncode == 2 and not proc.running and not proc.cancelled
    assert "hello" in proc.log and (0.5, "step1") in seen and (1.0, "step2") in seen
    assert proc.progress == 1.0 and proc.stage == "step2"
    assert proc.error_message() == "data.nii.gz: something is wrong"
    assert proc.seconds is not None and proc.seconds < 30


def test_cancel_kills_the_process_and_its_children(tmp_path):
    argv = python_script(tmp_path, """
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print("child", child.pid, flush=True)
        time.sleep(60)
    """)
    proc = QsmkitProcess(argv).start()
    deadline = time.monotonic() + 20
    while not any(line.startswith("child") for line in proc.log):
        assert proc.poll() and time.monotonic() < deadline
        time.sleep(0.02)
    child = int(next(line for line in proc.log if line.startswith("child")).split()[1])
    t0 = time.monotonic()
    proc.cancel()
    assert time.monotonic() - t0 < 5
    assert proc.cancelled and proc.returncode is not None and proc.returncode != 0
    assert not proc.poll() and proc.error_message() == "cancelled"
    for _ in range(100):  # the child is gone too (reaped by init once its parent died)
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the child process survived cancel")


def _gone(pid) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_cancel_ends_the_whole_tree_under_a_launcher(tmp_path):
    """Slicer runs the command as PythonSlicer (a launcher) -> python-real -> its workers. Here
    the launcher's child and grandchild each start a session of their own, so that, as on
    Windows, no process group reaches them: only a process-tree kill does."""
    pytest.importorskip("psutil", reason="psutil (shipped with Slicer) finds the process tree")
    (tmp_path / "worker.py").write_text(textwrap.dedent("""
        import subprocess, sys, time
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                                      start_new_session=True)
        print("pids", grandchild.pid, flush=True)
        time.sleep(30)
    """))
    argv = python_script(tmp_path, f"""
        import subprocess, sys
        child = subprocess.Popen([sys.executable, {str(tmp_path / "worker.py")!r}],
                                 start_new_session=True)
        print("child", child.pid, flush=True)
        sys.exit(child.wait())
    """)
    proc = QsmkitProcess(argv).start()
    deadline = time.monotonic() + 20
    while not any(line.startswith("pids") for line in proc.log):
        assert proc.poll() and time.monotonic() < deadline, proc.log
        time.sleep(0.02)
    child = int(next(line for line in proc.log if line.startswith("child")).split()[1])
    grandchild = int(next(line for line in proc.log if line.startswith("pids")).split()[1])
    assert not _gone(child) and not _gone(grandchild)
    t0 = time.monotonic()
    proc.cancel(grace=2.0)
    assert time.monotonic() - t0 < 10  # not after the 30 s the workers would sleep
    assert proc.cancelled and proc.returncode is not None and proc.returncode != 0
    for _ in range(40):
        if _gone(child) and _gone(grandchild):
            break
        time.sleep(0.05)
    assert _gone(child), "the launcher's child survived cancel"
    assert _gone(grandchild), "the grandchild survived cancel"


def test_wait_timeout_cancels(tmp_path):
    proc = QsmkitProcess(python_script(tmp_path, "import time; time.sleep(60)")).start()
    with pytest.raises(TimeoutError):
        proc.wait(timeout=0.3)
    assert proc.cancelled and proc.returncode is not None


def test_environment_puts_qsmkit_first():
    env = qsmkit_environment("/opt/qsm", {"PYTHONPATH": "/a" + os.pathsep + "/opt/qsm"})
    assert env["PYTHONPATH"].split(os.pathsep) == ["/opt/qsm", "/a"]
    assert env["PYTHONIOENCODING"] == "utf-8"
    assert jobs.qsmkit_parent() == str(REPO / "QSMExtension")


# ---------------------------------------------------------------- parameters and requirements

def test_echo_times_and_method_parameters():
    assert jobs.parse_echo_times_ms("20") == [0.02]
    assert jobs.parse_echo_times_ms("5, 10.5;15") == pytest.approx([0.005, 0.0105, 0.015])
    assert jobs.parse_echo_times_ms(20) == [0.02]
    for bad in ("", "abc", "0", "-5, 10"):
        with pytest.raises(ValueError):
            jobs.parse_echo_times_ms(bad)
    assert jobs.param_args("lam=0.05  max_iter=10;radii_mm=12,10") == [
        "lam=0.05", "max_iter=10", "radii_mm=12,10"]
    assert jobs.param_args({"lam": 0.1, "radii_mm": [12, 10]}) == ["lam=0.1", "radii_mm=12,10"]
    assert jobs.param_args("") == [] and jobs.param_args(None) == []
    with pytest.raises(ValueError, match="KEY=VALUE"):
        jobs.param_args("lam 0.1")


#: pyproject dependencies that no panel needs (see QSM/Resources/requirements.txt)
NOT_FOR_PANELS = {"slicerio", "pydicom"}


def test_requirements_are_the_panels_needs():
    tomllib = pytest.importorskip("tomllib", reason="needs Python >= 3.11 to read pyproject.toml")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    needed = {jobs.requirement_name(d).lower(): d for d in project["dependencies"]}
    listed = {jobs.requirement_name(r).lower(): r for r in jobs.read_requirements()}
    assert set(needed) - set(listed) == NOT_FOR_PANELS
    assert all(listed[name] == needed[name] for name in listed), "same version bounds as pyproject"
    assert jobs.missing_requirements() == []  # this environment has them all
    assert jobs.missing_requirements(["surely-not-a-package-qsm>=1", "numpy"]) == [
        "surely-not-a-package-qsm>=1"]


BLOCKING_PYTHON = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
from qsmkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_panel_commands_run_without_the_packages_not_installed_for_them(tmp_path):
    """What the panels run (simulate, run, combine) with slicerio and pydicom unimportable: the
    requirements list is enough."""
    code = BLOCKING_PYTHON.format(blocked=NOT_FOR_PANELS)
    env = qsmkit_environment(jobs.qsmkit_parent())

    def qsmkit(*args):
        proc = QsmkitProcess([sys.executable, "-c", code, *map(str, args)], env=env).start()
        assert proc.wait(timeout=300) == 0, proc.log[-5:]

    small = ["--shape", "24", "24", "16", "--voxel-size", "8", "8", "8"]
    qsmkit("simulate", "--out", tmp_path / "ph", *small, "--coils", "3", "--quiet")
    qsmkit("run", "--magnitude", tmp_path / "ph" / "magnitude.nii.gz", "--phase",
           tmp_path / "ph" / "phase.nii.gz", "--te", "0.02", "--b0", "3", "--out", tmp_path / "run",
           "--quiet")
    assert (tmp_path / "run" / "chi.nii.gz").is_file()
    qsmkit("combine", "--magnitude", tmp_path / "ph" / "coils_magnitude.nii.gz", "--phase",
           tmp_path / "ph" / "coils_phase.nii.gz", "--out-magnitude", tmp_path / "m.nii.gz",
           "--out-phase", tmp_path / "p.nii.gz", "--quiet")
    assert (tmp_path / "p.nii.gz").is_file()


# ---------------------------------------------------------------- jobs on MRML nodes

@pytest.fixture
def scene():
    try:
        import slicer
    except ImportError as err:
        pytest.skip(f"needs real MRML from the PyPI package slicer-core (pip install slicer-core): {err}")
    s = slicer.vtkMRMLScene()
    yield s
    s.Clear(1)


def simulate(out, *extra):
    assert cli.main(["simulate", "--out", str(out), "--quiet", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return simulate(tmp_path_factory.mktemp("phantom"), "--shape", "64", "64", "32",
                    "--voxel-size", "3.75", "3.75", "5")


@pytest.fixture(scope="module")
def oblique_phantom(tmp_path_factory):
    return simulate(tmp_path_factory.mktemp("oblique"), "--shape", "48", "48", "24",
                    "--voxel-size", "4", "4", "6", "--b0-dir", "0.25", "-0.2", "1")


def node_from_file(scene, path, name, class_name="vtkMRMLScalarVolumeNode"):
    vol = io.load_volume(path)
    node = scene.AddNewNodeByClass(class_name, name)
    sa.update_volume_from_array(node, vol.data, affine=vol.affine)
    return node


def same_as_file(node, path):
    return np.array_equal(sa.array_from_volume(node), io.load_volume(path).data)


@pytest.mark.parametrize("which", ["phantom", "oblique_phantom"])
def test_pipeline_job_equals_qsmkit_run(scene, tmp_path, request, which):
    folder = request.getfixturevalue(which)
    mag = node_from_file(scene, folder / "magnitude.nii.gz", "mag")
    pha = node_from_file(scene, folder / "phase.nii.gz", "pha")
    reference = tmp_path / "cli"
    assert cli.main(["run", "--magnitude", str(folder / "magnitude.nii.gz"),
                     "--phase", str(folder / "phase.nii.gz"), "--te", "0.02", "--b0", "3",
                     "--out", str(reference), "--quiet"]) == 0
    given_chi = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my chi")
    job = jobs.pipeline_job(mag, pha, [0.02], 3.0, outputs={
        "chi": given_chi, "mask": None, "field_total": None, "field_local": None,
        "local_mask": None})
    workdir = job.workdir
    progress = []
    nodes = job.run(scene, timeout=120, on_progress=lambda f, s: progress.append((f, s)))
    assert not os.path.exists(workdir)  # temporary files removed
    assert nodes["chi"] is given_chi
    assert progress[-1][0] == 1.0 and "inversion" in {stage for _f, stage in progress}
    for name, node in nodes.items():
        assert same_as_file(node, reference / f"{name}.nii.gz"), name
        assert sa.same_geometry(node, pha), name
        assert node.GetScene() is scene
    assert nodes["mask"].IsA("vtkMRMLLabelMapVolumeNode")
    assert nodes["field_local"].GetName() == "pha_field_local"
    # display presets: chi centred on 0, +-0.15 ppm; local field +-0.05 ppm; the total field
    # (background fields of several ppm) on Slicer's automatic window; all in ppm, told apart
    for name, half_width in (("chi", 0.15), ("field_local", 0.05)):
        display = nodes[name].GetDisplayNode()
        assert display.GetAutoWindowLevel() == 0, name
        assert display.GetWindow() == pytest.approx(2 * half_width) and display.GetLevel() == 0, name
    assert nodes["field_total"].GetDisplayNode().GetAutoWindowLevel() == 1
    for name in ("chi", "field_total", "field_local"):
        assert nodes[name].GetVoxelValueUnits().GetCodeValue() == "ppm", name
    assert sa.is_chi_map(nodes["chi"]) and not sa.is_chi_map(nodes["field_local"])
    assert not sa.is_chi_map(nodes["mask"]) and not sa.is_chi_map(mag)


def test_pipeline_job_with_mask_methods_and_params(scene, tmp_path, phantom):
    mag = node_from_file(scene, phantom / "magnitude.nii.gz", "mag")
    pha = node_from_file(scene, phantom / "phase.nii.gz", "pha")
    mask = node_from_file(scene, phantom / "mask_true.nii.gz", "mask", "vtkMRMLLabelMapVolumeNode")
    reference = tmp_path / "cli"
    assert cli.main(["run", "--magnitude", str(phantom / "magnitude.nii.gz"),
                     "--phase", str(phantom / "phase.nii.gz"), "--te", "0.02", "--b0", "3",
                     "--mask", str(phantom / "mask_true.nii.gz"), "--background", "vsharp",
                     "--inversion", "tkd", "--inversion-param", "threshold=0.2",
                     "--out", str(reference), "--quiet"]) == 0
    job = jobs.pipeline_job(mag, pha, [0.02], 3.0, mask=mask, background="vsharp",
                            inversion="tkd", params={"inversion": "threshold=0.2", "background": ""})
    assert "--inversion-param" in job.args and "threshold=0.2" in job.args
    nodes = job.run(scene, timeout=120)
    assert list(nodes) == ["chi"]
    assert same_as_file(nodes["chi"], reference / "chi.nii.gz")


def test_job_failure_reports_the_reason_and_cleans_up(scene, phantom):
    mag = node_from_file(scene, phantom / "magnitude.nii.gz", "mag")
    pha = node_from_file(scene, phantom / "phase.nii.gz", "pha")
    job = jobs.pipeline_job(mag, pha, [0.02, 0.03], 3.0)  # two echo times, one echo
    with pytest.raises(jobs.QsmkitJobError, match="echo"):
        job.run(scene, timeout=120)
    assert not os.path.exists(job.workdir)
    with pytest.raises(ValueError, match="unknown pipeline output"):
        jobs.pipeline_job(mag, pha, [0.02], 3.0, outputs={"phi": None})


def test_job_cancel(scene, phantom):
    mag = node_from_file(scene, phantom / "magnitude.nii.gz", "mag")
    pha = node_from_file(scene, phantom / "phase.nii.gz", "pha")
    job = jobs.pipeline_job(mag, pha, [0.02], 3.0)
    job.start()
    job.cancel()
    assert not os.path.exists(job.workdir)
    assert job.process.cancelled and job.process.returncode is not None
    with pytest.raises(jobs.QsmkitJobError, match="cancelled"):
        job.finish(scene)


def test_stage_jobs_equal_the_stage_commands(scene, tmp_path, phantom):
    mag = node_from_file(scene, phantom / "magnitude.nii.gz", "mag")
    total = node_from_file(scene, phantom / "field_total_true.nii.gz", "total")
    true_mask = node_from_file(scene, phantom / "mask_true.nii.gz", "brain",
                               "vtkMRMLLabelMapVolumeNode")
    # mask
    assert cli.main(["mask", "--magnitude", str(phantom / "magnitude.nii.gz"),
                     "--out", str(tmp_path / "mask.nii.gz"), "--quiet"]) == 0
    mask = jobs.mask_job(mag).run(scene, timeout=120)["mask"]
    assert mask.IsA("vtkMRMLLabelMapVolumeNode") and sa.same_geometry(mask, mag)
    assert same_as_file(mask, tmp_path / "mask.nii.gz")
    # background removal then inversion, from the true total field
    assert cli.main(["background", "--field", str(phantom / "field_total_true.nii.gz"),
                     "--mask", str(phantom / "mask_true.nii.gz"), "--method", "vsharp",
                     "--out", str(tmp_path / "local.nii.gz")]) == 0
    local = jobs.background_job(total, true_mask, method="vsharp").run(scene, timeout=120)
    assert same_as_file(local["field_local"], tmp_path / "local.nii.gz")
    assert same_as_file(local["local_mask"], tmp_path / "local_mask.nii.gz")
    assert cli.main(["invert", "--field", str(tmp_path / "local.nii.gz"),
                     "--mask", str(tmp_path / "local_mask.nii.gz"), "--method", "l2",
                     "--magnitude", str(phantom / "magnitude.nii.gz"),
                     "--out", str(tmp_path / "chi.nii.gz")]) == 0
    chi = jobs.invert_job(local["field_local"], local["local_mask"], magnitude=mag,
                          method="l2").run(scene, timeout=120)["chi"]
    assert same_as_file(chi, tmp_path / "chi.nii.gz") and sa.same_geometry(chi, total)


def test_invert_job_references_chi_like_the_command(scene, tmp_path, phantom):
    """The Dipole Inversion module's reference choices (mask, a label-map region and one of its
    labels) give what ``qsmkit invert --reference`` gives."""
    local = node_from_file(scene, phantom / "field_local_true.nii.gz", "local")
    mask = node_from_file(scene, phantom / "mask_true.nii.gz", "brain", "vtkMRMLLabelMapVolumeNode")
    labels = node_from_file(scene, phantom / "labels.nii.gz", "labels", "vtkMRMLLabelMapVolumeNode")
    from qsmkit.simulate import LABEL_IDS

    csf = LABEL_IDS["csf"]
    common = ["invert", "--field", str(phantom / "field_local_true.nii.gz"), "--mask",
              str(phantom / "mask_true.nii.gz"), "--method", "tkd"]
    for tag, extra, kwargs in (
            ("mask", ["--reference", "mask"], {"reference": "mask"}),
            ("label", ["--reference", str(phantom / "labels.nii.gz"), "--reference-label", str(csf)],
             {"reference": labels, "reference_label": csf})):
        out = tmp_path / f"chi_{tag}.nii.gz"
        assert cli.main([*common, *extra, "--out", str(out)]) == 0
        chi = jobs.invert_job(local, mask, method="tkd", **kwargs).run(scene, timeout=120)["chi"]
        assert same_as_file(chi, out), tag
        region = (io.load_volume(phantom / "labels.nii.gz").data == csf) if tag == "label" else \
            io.load_volume(phantom / "mask_true.nii.gz").data > 0
        assert abs(float(sa.array_from_volume(chi)[region].mean())) < 1e-6, tag
    with pytest.raises(ValueError, match="reference"):
        jobs.invert_job(local, mask, reference="csf")


@pytest.fixture(scope="module")
def coil_phantom(tmp_path_factory):
    return simulate(tmp_path_factory.mktemp("coils"), "--shape", "48", "48", "24", "--voxel-size",
                    "5", "5", "6", "--coils", "6", "--body-coil", "--te", "0.005", "0.010")


def test_combine_job_equals_the_command(scene, tmp_path, coil_phantom):
    """The Coil Combination module's job: channels as a sequence of echoes x channels items
    (echo-major), a body coil as a sequence of echoes; outputs equal ``qsmkit combine``."""
    folder = coil_phantom
    mag5 = io.load_volume(folder / "coils_magnitude.nii.gz")
    pha5 = io.load_volume(folder / "coils_phase.nii.gz")
    n_echoes, n_channels = mag5.data.shape[3:]

    def sequence(name, data5=None, data4=None):
        seq = scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
        items = ([data5[..., e, c] for e in range(n_echoes) for c in range(n_channels)]
                 if data5 is not None else [data4[..., e] for e in range(data4.shape[3])])
        for i, a in enumerate(items):
            node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{name}{i}")
            sa.update_volume_from_array(node, a, affine=mag5.affine)
            seq.SetDataNodeAtValue(node, str(i))
        return seq

    mag = sequence("mag", mag5.data)
    pha = sequence("pha", pha5.data)
    body_m = sequence("bm", data4=io.load_volume(folder / "body_coil_magnitude.nii.gz").data)
    body_p = sequence("bp", data4=io.load_volume(folder / "body_coil_phase.nii.gz").data)
    assert cli.main(["combine", "--magnitude", str(folder / "coils_magnitude.nii.gz"),
                     "--phase", str(folder / "coils_phase.nii.gz"),
                     "--body-magnitude", str(folder / "body_coil_magnitude.nii.gz"),
                     "--body-phase", str(folder / "body_coil_phase.nii.gz"), "--te", "0.005", "0.010",
                     "--out-magnitude", str(tmp_path / "m.nii.gz"), "--out-phase",
                     str(tmp_path / "p.nii.gz"), "--quiet"]) == 0
    nodes = jobs.combine_job(mag, pha, body_m, body_p, n_echoes=n_echoes, te=[0.005, 0.010]).run(
        scene, timeout=120)
    for name, path in (("magnitude", "m.nii.gz"), ("phase", "p.nii.gz")):
        assert np.allclose(sa.array_from_volume(nodes[name]), io.load_volume(tmp_path / path).data,
                           atol=1e-6), name
        assert nodes[name].IsA("vtkMRMLVectorVolumeNode")
    with pytest.raises(Exception, match="echoes"):
        jobs.combine_job(mag, pha, n_echoes=5)


def test_acquisition_parameters_from_sidecar_and_dicom(scene, tmp_path, phantom):
    image = tmp_path / "sub-01_part-phase_GRE.nii.gz"
    image.write_bytes((phantom / "phase.nii.gz").read_bytes())
    (tmp_path / "sub-01_part-phase_GRE.json").write_text(
        json.dumps({"EchoTime": 0.0201, "MagneticFieldStrength": 2.89}))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "phase")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(image))
    assert storage.ReadData(node)
    node.SetAndObserveStorageNodeID(storage.GetID())
    found = jobs.acquisition_parameters(node)
    assert found == {"te": [0.0201], "b0": 2.89, "source": "JSON sidecar"}
    # DICOM: one echo time per item of a multi-echo sequence, in ms in the header
    header = {("1.2.3", "0018,0081"): "5", ("1.2.4", "0018,0081"): "10.5",
              ("1.2.3", "0018,0087"): "3", ("1.2.4", "0018,0087"): "3"}
    seq = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "echoes")
    for i, uid in enumerate(("1.2.3", "1.2.4")):
        item = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"e{i}")
        item.SetAttribute("DICOM.instanceUIDs", f"{uid} 9.9.9")
        seq.SetDataNodeAtValue(item, str(i))
    found = jobs.acquisition_parameters(seq, lambda uid, tag: header.get((uid, tag)))
    assert found["te"] == pytest.approx([0.005, 0.0105]) and found["b0"] == 3.0
    assert found["source"] == "DICOM"
    # with the imaging frequency recorded, B0 is the field the phase evolved in (f / gamma)
    header[("1.2.3", "0018,0084")] = "123.25483"
    found = jobs.acquisition_parameters(seq, lambda uid, tag: header.get((uid, tag)))
    assert found["b0"] == pytest.approx(123.25483 / 42.5775)
    bare = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "bare")
    assert jobs.acquisition_parameters(bare) == {"te": None, "b0": None, "source": None}
