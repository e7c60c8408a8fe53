"""Sample Data > QSM > QSMPhantom through Slicer's real SampleData logic (v5.12.3 sources in
../shared/slicer-reference) on real MRML: registered as the QSM module registers it at start-up,
``downloadSample`` / ``downloadSamples`` copy the shipped files into the cache, check their
SHA256 and load magnitude, phase and the segmentation. The shipped files are what
tools/make_sample_data.py writes from ``qsmkit simulate`` now.

(``downloadFromSource``, which both the button and ``downloadSample`` go through, never calls a
``customDownloader``; a source registered with one and no files gave ``IndexError``.)
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import types

import numpy as np
import pytest

import slicer_reference

slicer_reference.skip_unless_available()

from qsmkit import io  # noqa: E402
from qsmkit import slicer_adapter as sa  # noqa: E402

FOLDER = slicer_reference.REPO / "QSMExtension" / "QSM" / "Resources" / "SampleData"


def sample_data_constant() -> tuple:
    tree = ast.parse((slicer_reference.REPO / "QSMExtension" / "QSM" / "QSM.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.Assign)
                and getattr(n.targets[0], "id", "") == "SAMPLE_DATA")
    return ast.literal_eval(node.value)


def load_tool():
    spec = importlib.util.spec_from_file_location(
        "make_sample_data", slicer_reference.REPO / "tools" / "make_sample_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """``qsmkit simulate`` now, with the tool's arguments."""
    return load_tool().simulate(tmp_path_factory.mktemp("phantom"))


@pytest.fixture
def sample_data(tmp_path, monkeypatch):
    slicer = slicer_reference.load()
    cache = slicer.vtkCacheManager()
    cache.SetRemoteCacheDirectory(str(tmp_path / "cache"))
    slicer.mrmlScene.SetCacheManager(cache)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace())
    import SampleData

    import QSM

    QSM.registerSampleData()
    return slicer, SampleData


def test_checksums_and_content_are_current(simulated, tmp_path):
    for name, _node, sha in sample_data_constant():
        assert hashlib.sha256((FOLDER / name).read_bytes()).hexdigest() == sha, name
    for stem in ("magnitude", "phase"):
        shipped, now = io.load_volume(FOLDER / f"QSMPhantom_{stem}.nii.gz"), io.load_volume(
            simulated / f"{stem}.nii.gz")
        assert np.array_equal(shipped.data, now.data) and np.allclose(shipped.affine, now.affine), stem
    tool = load_tool()
    labels = io.load_volume(simulated / "labels.nii.gz")
    tool.write_segmentation(np.rint(labels.data).astype(np.int32), labels.affine,
                            tool.label_names(simulated), tmp_path / "labels.seg.nrrd")
    import slicerio

    shipped, now = (slicerio.read_segmentation(str(p)) for p in
                    (FOLDER / "QSMPhantom_labels.seg.nrrd", tmp_path / "labels.seg.nrrd"))
    assert np.array_equal(shipped["voxels"], now["voxels"])
    assert np.allclose(shipped["ijkToLPS"], now["ijkToLPS"])
    assert [(s["name"], s["labelValue"]) for s in shipped["segments"]] == \
        [(s["name"], s["labelValue"]) for s in now["segments"]]


def test_download_sample_with_slicers_sample_data(sample_data, tmp_path):
    slicer, SampleData = sample_data
    logic = SampleData.SampleDataLogic()
    source = logic.sourceForSampleName("QSMPhantom")
    assert logic.categoryForSource(source) == "QSM"
    nodes = logic.downloadSamples("QSMPhantom")
    names = [node for _name, node, _sha in sample_data_constant()]
    assert [n.GetName() for n in nodes] == names
    magnitude, phase, labels = nodes
    for node, name in ((magnitude, "QSMPhantom_magnitude.nii.gz"), (phase, "QSMPhantom_phase.nii.gz")):
        vol = io.load_volume(FOLDER / name)
        assert np.array_equal(sa.array_from_volume(node), vol.data), name
        assert np.allclose(sa.ijk_to_ras(node), vol.affine, atol=1e-5), name
        assert (tmp_path / "cache" / name).is_file()  # through Slicer's download path
        assert node.GetStorageNode() is None  # SampleData drops the cache file's storage node
    # the segmentation: one named segment per phantom region, on the phase's voxels
    assert labels.IsA("vtkMRMLSegmentationNode")
    seg_names = sa.segment_names(labels)
    assert {"csf", "globus_pallidus", "putamen", "caudate"} <= set(seg_names.values())
    # Slicer's own module-level function returns the first node (it raised IndexError before)
    first = SampleData.downloadSample("QSMPhantom")
    assert first.IsA("vtkMRMLScalarVolumeNode") and first.GetName() == names[0]


def test_segments_are_the_phantom_regions(sample_data, simulated):
    """Each segment's voxels on the magnitude's grid are the phantom's label (qsmkit simulate)."""
    _slicer, SampleData = sample_data
    magnitude, _phase, labels = SampleData.downloadSamples("QSMPhantom")
    truth = np.rint(io.load_volume(simulated / "labels.nii.gz").data).astype(int)
    names = load_tool().label_names(simulated)
    by_name = {v: k for k, v in sa.segment_names(labels).items()}
    for value in (1, 4, 8, 9):  # csf, globus pallidus, putamen, caudate
        mask = sa.segment_mask(labels, by_name[names[value]], magnitude)
        assert mask.sum() > 0 and np.array_equal(mask, truth == value), names[value]
