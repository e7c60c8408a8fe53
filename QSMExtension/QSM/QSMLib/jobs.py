"""qsmkit commands on MRML nodes: write the inputs, run ``qsmkit``, read the outputs back.

A :class:`QsmkitJob` is one ``qsmkit`` command on volume nodes. It writes the input nodes as
NIfTI files (voxels and IJK-to-RAS exactly as in the scene, through
:mod:`qsmkit.slicer_adapter`) into a temporary folder, runs the command in a background
process (:class:`~QSMLib.process.QsmkitProcess`), loads the outputs into volume nodes with
exactly the input's geometry and removes the folder, whether the command succeeded, failed or
was cancelled. The builders (:func:`pipeline_job`, :func:`mask_job`, :func:`unwrap_job`,
:func:`background_job`, :func:`invert_job`) are what the Slicer modules' logic calls; they
need MRML nodes but no Qt, so they run in scripts and tests with ``slicer-core``.

Because the job runs the very ``qsmkit`` command line on the very voxels of the nodes, its
results equal ``qsmkit run`` on files holding the same data, bit for bit.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass

from .process import QsmkitProcess, qsmkit_command, qsmkit_environment

MODULE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIREMENTS_FILE = os.path.join(MODULE_DIR, "Resources", "requirements.txt")
#: pip name -> import name, where they differ
IMPORT_NAMES = {"scikit-image": "skimage", "pynrrd": "nrrd", "dask": "dask"}

#: outputs of ``qsmkit run`` (file stem in the output folder): the node class they become, their
#: units, quantity and display preset (:data:`qsmkit.slicer_adapter.DISPLAY_PRESETS`)
PIPELINE_OUTPUTS = {
    "chi": ("vtkMRMLScalarVolumeNode", "ppm", "chi", "chi"),
    "mask": ("vtkMRMLLabelMapVolumeNode", None, None, None),
    "field_total": ("vtkMRMLScalarVolumeNode", "ppm", "field", None),
    "field_local": ("vtkMRMLScalarVolumeNode", "ppm", "field", "local_field"),
    "local_mask": ("vtkMRMLLabelMapVolumeNode", None, None, None),
}


class QsmkitJobError(RuntimeError):
    """A qsmkit command failed; the message is its one-line reason."""


# ---------------------------------------------------------------- environment

def read_requirements(path: str = REQUIREMENTS_FILE) -> list:
    """Requirement specifiers (one a line, ``#`` comments) of the Python packages qsmkit needs."""
    with open(path, encoding="utf-8") as fh:
        lines = [ln.split("#", 1)[0].strip() for ln in fh]
    return [ln for ln in lines if ln]


def requirement_name(spec: str) -> str:
    """``"scikit-image>=0.21"`` -> ``"scikit-image"``."""
    return re.split(r"[\s<>=!~;\[]", spec.strip(), maxsplit=1)[0]


def missing_requirements(requirements=None) -> list:
    """The requirement specifiers whose package cannot be imported here (checked without
    importing them)."""
    importlib.invalidate_caches()  # packages installed since this process started count too
    out = []
    for spec in read_requirements() if requirements is None else requirements:
        name = requirement_name(spec)
        module = IMPORT_NAMES.get(name, name.replace("-", "_"))
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken or half-installed package
            found = False
        if not found:
            out.append(spec)
    return out


def qsmkit_parent() -> str | None:
    """The folder holding the ``qsmkit`` package this process imports (for the child's
    PYTHONPATH), found without importing qsmkit's dependencies."""
    spec = importlib.util.find_spec("qsmkit")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.dirname(os.path.abspath(list(spec.submodule_search_locations)[0]))


# ---------------------------------------------------------------- parameters

def parse_echo_times_ms(text) -> list:
    """``"5, 10.5 15"`` (ms) -> [0.005, 0.0105, 0.015] (s). Raises ValueError on bad input."""
    if isinstance(text, (int, float)):
        values = [float(text)]
    else:
        items = [t for t in re.split(r"[,;\s]+", str(text).strip()) if t]
        if not items:
            raise ValueError("give the echo time(s) in ms, e.g. 20 or 5, 10, 15")
        try:
            values = [float(t) for t in items]
        except ValueError:
            raise ValueError(f"echo times must be numbers in ms, got {text!r}") from None
    if any(not (v > 0) for v in values):
        raise ValueError(f"echo times must be positive, got {text!r}")
    return [v / 1000.0 for v in values]


def param_args(params) -> list:
    """Method parameters as ``KEY=VALUE`` items: from a dict, or from text such as
    ``"lam=0.05 max_iter=100"`` (items separated by spaces or semicolons)."""
    if not params:
        return []
    if isinstance(params, dict):
        items = []
        for k, v in params.items():
            if isinstance(v, (list, tuple)):
                v = ",".join(str(x) for x in v)
            items.append(f"{k}={v}")
        return items
    items = [t for t in re.split(r"[;\s]+", str(params).strip()) if t]
    bad = [t for t in items if "=" not in t]
    if bad:
        raise ValueError(f"method parameters are KEY=VALUE items, got {bad[0]!r}")
    return items


def acquisition_parameters(node, dicom_value=None) -> dict:
    """Echo times (s) and field strength (T) recorded with a volume (or sequence) node:
    from a dcm2niix/BIDS JSON sidecar beside the file it was loaded from (``EchoTime``,
    ``ImagingFrequency`` / ``MagneticFieldStrength``), or from DICOM through
    ``dicom_value(instance_uid, tag)`` (in Slicer: the DICOM database; tags 0018,0081 echo time
    in ms, 0018,0084 imaging frequency in MHz, 0018,0087 field strength). B0 is the field the
    phase evolved in, ImagingFrequency / gamma, when that is within 10 % of the nominal field
    strength (as ``qsmkit run`` reads it: ``qsmkit.scanner.b0_from_sidecar``).
    Returns {"te": [...] or None, "b0": float or None, "source": text}."""
    from qsmkit.errors import QSMInputError
    from qsmkit.scanner import b0_from_sidecar

    def field_of(meta):
        try:
            return b0_from_sidecar(meta)[0]
        except QSMInputError:
            return None

    items = [node]
    if node is not None and node.IsA("vtkMRMLSequenceNode"):
        items = [node.GetNthDataNode(i) for i in range(node.GetNumberOfDataNodes())]
    tes, b0, sources = [], None, set()
    for item in items:
        te_item, b0_item = None, None
        storage = item.GetStorageNode() if item is not None and hasattr(item, "GetStorageNode") else None
        path = storage.GetFileName() if storage is not None else None
        if path:
            from qsmkit.io import read_sidecar

            meta = read_sidecar(path)
            te_item = meta.get("EchoTime")
            b0_item = field_of(meta)
            if te_item is not None or b0_item is not None:
                sources.add("JSON sidecar")
        uids = (item.GetAttribute("DICOM.instanceUIDs") or "").split() if item is not None else []
        if dicom_value is not None and uids and (te_item is None or b0_item is None):
            te_ms = _number(dicom_value(uids[0], "0018,0081"))
            field = _number(dicom_value(uids[0], "0018,0087"))
            frequency = _number(dicom_value(uids[0], "0018,0084"))
            if te_item is None and te_ms is not None:
                te_item = te_ms / 1000.0
            if b0_item is None:
                b0_item = field_of({k: v for k, v in (("MagneticFieldStrength", field),
                                                      ("ImagingFrequency", frequency))
                                    if v is not None})
            if te_ms is not None or field is not None:
                sources.add("DICOM")
        if isinstance(te_item, (list, tuple)):
            tes.extend(float(t) for t in te_item)
        elif te_item is not None:
            tes.append(float(te_item))
        if b0 is None and b0_item is not None:
            b0 = float(b0_item)
    return {"te": tes or None, "b0": b0, "source": " and ".join(sorted(sources)) or None}


def _number(text):
    try:
        value = float(str(text).split("\\")[0])
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None


# ---------------------------------------------------------------- the job

@dataclass
class OutputSpec:
    name: str            # key in the result dict
    path: str            # file the command writes
    like: object         # volume node whose geometry the output takes
    node: object = None  # node to fill; None: a new node is added to the scene
    node_name: str = ""
    class_name: str = "vtkMRMLScalarVolumeNode"
    units: str | None = None
    quantity: str | None = None  # "chi" or "field", recorded with the node
    preset: str | None = None  # display preset: "chi" or "local_field"


class QsmkitJob:
    """One ``qsmkit`` command on volume nodes (see the module docstring)."""

    def __init__(self, command: str, workdir: str | None = None, python: str | None = None,
                 env: dict | None = None):
        self.command = command
        self.args = [command]
        self.workdir = workdir or tempfile.mkdtemp(prefix="qsmkit-slicer-")
        self.python = python
        self.base_env = env
        self.outputs: list[OutputSpec] = []
        self.process: QsmkitProcess | None = None

    # -------------------------------------------------------------- building

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def add_input(self, flag: str, nodes, name: str) -> str:
        """Write a volume node (or nodes: one per echo, or a sequence) as ``name.nii.gz``
        and pass it with ``flag``. Voxel types are kept (integer vendor phase stays integer)."""
        from qsmkit import io
        from qsmkit.slicer_adapter import volume_arrays

        arrays = volume_arrays(nodes)
        path = self.path(f"{name}.nii.gz")
        io.save_volume(path, arrays.data, arrays.affine, dtype=None)
        self.args += [flag, path]
        return path

    def add_channels(self, flag: str, nodes, name: str, n_echoes: int = 1) -> str:
        """Channel images (a sequence or multi-volume of N = echoes x channels items, all
        channels of the first echo first) as a 4-D (x, y, z, channel) or 5-D (x, y, z, echo,
        channel) ``name.nii.gz`` passed with ``flag``."""
        from qsmkit import io
        from qsmkit.errors import QSMInputError
        from qsmkit.slicer_adapter import volume_arrays

        arrays = volume_arrays(nodes)
        data = arrays.data if arrays.data.ndim == 4 else arrays.data[..., None]
        n = data.shape[3]
        if n_echoes < 1 or n % n_echoes:
            raise QSMInputError(f"{n} channel images cannot be split into {n_echoes} echoes")
        if n_echoes > 1:  # echo-major order: item e * C + c is echo e, channel c
            data = data.reshape(data.shape[:3] + (n_echoes, n // n_echoes))
        path = self.path(f"{name}.nii.gz")
        io.save_volume(path, data, arrays.affine, dtype=None)
        self.args += [flag, path]
        return path

    def add_option(self, flag: str, *values):
        self.args += [flag, *[str(v) for v in values]]

    def add_params(self, flag: str, params):
        for item in param_args(params):
            self.args += [flag, item]

    def add_output(self, name: str, path: str, like, node=None, node_name: str = "",
                   class_name: str = "vtkMRMLScalarVolumeNode", units: str | None = None,
                   quantity: str | None = None, preset: str | None = None):
        self.outputs.append(OutputSpec(name, path, like, node, node_name or name, class_name, units,
                                       quantity, preset))

    @property
    def argv(self) -> list:
        return qsmkit_command(self.args, self.python)

    # -------------------------------------------------------------- running

    def start(self, on_line=None, on_progress=None) -> QsmkitProcess:
        env = qsmkit_environment(qsmkit_parent(), self.base_env)
        self.process = QsmkitProcess(self.argv, env=env, cwd=self.workdir, on_line=on_line,
                                     on_progress=on_progress)
        try:
            self.process.start()
        except BaseException:
            self.cleanup()
            raise
        return self.process

    def finish(self, scene=None) -> dict:
        """After the process ended: the outputs as volume nodes (name -> node). Raises
        :class:`QsmkitJobError` with the command's reason when it failed or was cancelled."""
        from qsmkit import geometry, io
        from qsmkit.slicer_adapter import _image_data, create_volume_node, ijk_to_ras

        proc = self.process
        if proc is None or proc.returncode is None:
            raise RuntimeError("the job has not finished")
        if proc.cancelled:
            raise QsmkitJobError("cancelled")
        if proc.returncode != 0:
            raise QsmkitJobError(proc.error_message())
        nodes = {}
        for out in self.outputs:
            vol = io.load_volume(out.path, what=out.name)
            like_shape = tuple(_image_data(out.like).GetDimensions())
            if not geometry.same_grid(ijk_to_ras(out.like), like_shape, vol.affine, vol.shape3):
                raise QsmkitJobError(f"{out.name}: output grid differs from the input's")
            nodes[out.name] = create_volume_node(scene, vol.data, out.like, out.node_name,
                                                 node=out.node, class_name=out.class_name,
                                                 units=out.units, quantity=out.quantity,
                                                 preset=out.preset)
        return nodes

    def run(self, scene=None, timeout: float | None = None, on_line=None, on_progress=None) -> dict:
        """Start, wait, load the outputs and clean up: the blocking form for scripts."""
        try:
            self.start(on_line=on_line, on_progress=on_progress)
            self.process.wait(timeout=timeout)
            return self.finish(scene)
        finally:
            self.cleanup()

    def cancel(self):
        if self.process is not None:
            self.process.cancel()
        self.cleanup()

    def cleanup(self):
        shutil.rmtree(self.workdir, ignore_errors=True)


# ---------------------------------------------------------------- builders

def _name(node, suffix):
    base = node.GetName() if node is not None and hasattr(node, "GetName") else "qsm"
    return f"{base}_{suffix}"


def _like(nodes):
    """The volume node whose grid the outputs take: the first volume of ``nodes``."""
    from qsmkit.slicer_adapter import _data_nodes

    first = nodes[0] if isinstance(nodes, (list, tuple)) else nodes
    return _data_nodes(first)[0]


def pipeline_job(magnitude, phase, te, b0, mask=None, masking="auto", unwrapping="auto",
                 background="auto", inversion="auto", params=None, device="auto",
                 b0_world=None, outputs=None, **job_kwargs) -> QsmkitJob:
    """``qsmkit run`` on nodes. ``te``: seconds (list, one per echo); ``params``: stage ->
    parameters (dict or ``"k=v k=v"``); ``outputs``: name -> node or None (a new node) for
    any of :data:`PIPELINE_OUTPUTS`; default: chi only."""
    job = QsmkitJob("run", **job_kwargs)
    try:
        job.add_input("--magnitude", magnitude, "magnitude")
        job.add_input("--phase", phase, "phase")
        if mask is not None:
            job.add_input("--mask", mask, "mask_in")
        job.add_option("--te", *[repr(float(t)) for t in te])
        job.add_option("--b0", repr(float(b0)))
        for flag, value in (("--masking", masking), ("--unwrapping", unwrapping),
                            ("--background", background), ("--inversion", inversion),
                            ("--device", device)):
            job.add_option(flag, value or "auto")
        for stage, value in (params or {}).items():
            job.add_params(f"--{stage}-param", value)
        if b0_world is not None:
            job.add_option("--b0-dir", *[repr(float(v)) for v in b0_world])
        out_dir = job.path("out")
        job.add_option("--out", out_dir)
        like = _like(phase)
        for name, node in (outputs or {"chi": None}).items():
            if name not in PIPELINE_OUTPUTS:
                raise ValueError(f"unknown pipeline output {name!r}; choose from "
                                 f"{', '.join(PIPELINE_OUTPUTS)}")
            class_name, units, quantity, preset = PIPELINE_OUTPUTS[name]
            job.add_output(name, os.path.join(out_dir, f"{name}.nii.gz"), like, node,
                           _name(like, name), class_name, units, quantity, preset)
    except BaseException:
        job.cleanup()
        raise
    return job


def mask_job(magnitude, method="auto", erode_mm=0.0, params=None, output=None, **job_kwargs):
    """``qsmkit mask``: brain mask (label map node) from the magnitude."""
    job = QsmkitJob("mask", **job_kwargs)
    try:
        job.add_input("--magnitude", magnitude, "magnitude")
        job.add_option("--method", method or "auto")
        if erode_mm:
            job.add_option("--erode", repr(float(erode_mm)))
        job.add_params("--param", params)
        out = job.path("mask.nii.gz")
        job.add_option("--out", out)
        like = _like(magnitude)
        job.add_output("mask", out, like, output, _name(like, "mask"), "vtkMRMLLabelMapVolumeNode")
    except BaseException:
        job.cleanup()
        raise
    return job


def unwrap_job(phase, magnitude=None, mask=None, method="auto", params=None, output=None,
               **job_kwargs):
    """``qsmkit unwrap``: unwrapped phase (rad), one echo or several."""
    job = QsmkitJob("unwrap", **job_kwargs)
    try:
        job.add_input("--phase", phase, "phase")
        if magnitude is not None:
            job.add_input("--magnitude", magnitude, "magnitude")
        if mask is not None:
            job.add_input("--mask", mask, "mask")
        job.add_option("--method", method or "auto")
        job.add_params("--param", params)
        out = job.path("unwrapped.nii.gz")
        job.add_option("--out", out)
        like = _like(phase)
        job.add_output("unwrapped", out, like, output, _name(like, "unwrapped"), units="rad")
    except BaseException:
        job.cleanup()
        raise
    return job


def _field_options(job, field_units, b0, te):
    job.add_option("--field-units", field_units or "ppm")
    if b0 is not None:
        job.add_option("--b0", repr(float(b0)))
    if te:
        job.add_option("--te", *[repr(float(t)) for t in te])


def background_job(field, mask, method="auto", weights=None, params=None, field_units="ppm",
                   b0=None, te=None, device="auto", output=None, output_mask=None, **job_kwargs):
    """``qsmkit background``: local field (ppm) and the mask where it is valid."""
    job = QsmkitJob("background", **job_kwargs)
    try:
        job.add_input("--field", field, "field")
        job.add_input("--mask", mask, "mask")
        if weights is not None:
            job.add_input("--weights", weights, "weights")
        job.add_option("--method", method or "auto")
        job.add_params("--param", params)
        _field_options(job, field_units, b0, te)
        job.add_option("--device", device or "auto")
        out, out_mask = job.path("local.nii.gz"), job.path("local_mask.nii.gz")
        job.add_option("--out", out)
        job.add_option("--out-mask", out_mask)
        like = _like(field)
        job.add_output("field_local", out, like, output, _name(like, "local"), units="ppm",
                       quantity="field", preset="local_field")
        job.add_output("local_mask", out_mask, like, output_mask, _name(like, "local_mask"),
                       "vtkMRMLLabelMapVolumeNode")
    except BaseException:
        job.cleanup()
        raise
    return job


def invert_job(field, mask, magnitude=None, method="auto", params=None, field_units="ppm",
               b0=None, te=None, device="auto", output=None, reference=None,
               reference_label=None, **job_kwargs):
    """``qsmkit invert``: chi (ppm) from the local field. ``reference``: None (chi as the
    method returns it), ``"mask"`` (relative to the mean over the mask) or a label-map node
    (relative to its voxels, or to those equal to ``reference_label``), e.g. CSF."""
    job = QsmkitJob("invert", **job_kwargs)
    try:
        job.add_input("--field", field, "field")
        job.add_input("--mask", mask, "mask")
        if magnitude is not None:
            job.add_input("--magnitude", magnitude, "magnitude")
        if isinstance(reference, str):
            if reference != "mask":
                raise ValueError(f"reference must be 'mask' or a label-map node, not {reference!r}")
            job.add_option("--reference", "mask")
        elif reference is not None:
            job.add_input("--reference", reference, "reference")
            if reference_label is not None:
                job.add_option("--reference-label", int(reference_label))
        job.add_option("--method", method or "auto")
        job.add_params("--param", params)
        _field_options(job, field_units, b0, te)
        job.add_option("--device", device or "auto")
        out = job.path("chi.nii.gz")
        job.add_option("--out", out)
        like = _like(field)
        job.add_output("chi", out, like, output, _name(like, "chi"), units="ppm", quantity="chi",
                       preset="chi")
    except BaseException:
        job.cleanup()
        raise
    return job


def combine_job(magnitude, phase, body_magnitude=None, body_phase=None, n_echoes=1, te=None,
                method="auto", params=None, output_magnitude=None, output_phase=None,
                **job_kwargs) -> QsmkitJob:
    """``qsmkit combine``: channel magnitude and phase (sequences or multi-volumes of
    echoes x channels items, echo-major) -> combined magnitude and phase (rad) nodes, one
    component per echo; optional body-coil magnitude and phase (one item per echo)."""
    job = QsmkitJob("combine", **job_kwargs)
    try:
        job.add_channels("--magnitude", magnitude, "channels_magnitude", n_echoes)
        job.add_channels("--phase", phase, "channels_phase", n_echoes)
        if (body_magnitude is None) != (body_phase is None):
            raise ValueError("give both the body-coil magnitude and phase, or neither")
        if body_magnitude is not None:
            job.add_input("--body-magnitude", body_magnitude, "body_magnitude")
            job.add_input("--body-phase", body_phase, "body_phase")
        if te:
            job.add_option("--te", *[repr(float(t)) for t in te])
        job.add_option("--method", method or "auto")
        job.add_params("--param", params)
        out_mag, out_pha = job.path("combined_magnitude.nii.gz"), job.path("combined_phase.nii.gz")
        job.add_option("--out-magnitude", out_mag)
        job.add_option("--out-phase", out_pha)
        like = _like(magnitude)
        # several echoes: one multi-volume (vector volume) node, a component per echo, which
        # the QSM module takes as its multi-echo input
        cls = "vtkMRMLVectorVolumeNode" if n_echoes > 1 else "vtkMRMLScalarVolumeNode"
        job.add_output("magnitude", out_mag, like, output_magnitude, _name(like, "combined_magnitude"),
                       cls)
        job.add_output("phase", out_pha, like, output_phase, _name(like, "combined_phase"), cls,
                       units="rad")
    except BaseException:
        job.cleanup()
        raise
    return job
