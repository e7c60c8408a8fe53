"""The extension as a whole: its minimum Slicer version against the Python features the code uses,
its ExtensionsIndex entry, and its modules importing (and registering their start-up hooks) in a
Slicer that has only its stock packages.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXTENSION = REPO / "QSMExtension"
MODULES = ["QSM", "QSMBackgroundRemoval", "QSMDipoleInversion", "QSMCoilCombination"]

#: The Python each Slicer release ships. 5.8 and before: 3.9.10; 5.10 on: 3.12.10 (Slicer pull
#: request 8456, "Upgrade from python 3.9.10 to 3.12.10", first released in 5.10).
SLICER_PYTHON = {(5, 6): (3, 9), (5, 8): (3, 9), (5, 10): (3, 12), (5, 12): (3, 12)}


def version_tuple(text: str) -> tuple:
    return tuple(int(x) for x in text.split("."))


def declared_minimums() -> dict:
    """The minimum Slicer version as each place states it."""
    cmake = (REPO / "CMakeLists.txt").read_text()
    tree = ast.parse((EXTENSION / "QSM" / "QSM.py").read_text())
    consts = {n.targets[0].id: n.value for n in tree.body
              if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name)}
    readme = (REPO / "README.md").read_text()
    description = re.search(r'set\(EXTENSION_DESCRIPTION "([^"]*)"\)', cmake).group(1)
    return {
        "CMakeLists.txt": re.search(r'set\(QSMExtension_MINIMUM_SLICER_VERSION "([\d.]+)"\)', cmake).group(1),
        "EXTENSION_DESCRIPTION": re.search(r"Requires Slicer ([\d.]+) or later", description).group(1),
        "QSM.py": ast.literal_eval(consts["MINIMUM_SLICER_VERSION"]),
        "README.md": re.search(r"\*\*Requires 3D Slicer ([\d.]+) or later\*\*", readme).group(1),
    }


def code_minimum_python() -> tuple:
    """The lowest Python that runs every file of the extension (modules and qsmkit), as
    vermin (a Python-version feature detector) finds it from the source."""
    vermin = shutil.which("vermin", path=str(Path(sys.executable).parent)) or shutil.which("vermin")
    if vermin is None:
        pytest.skip("needs vermin (pip install vermin: in the test extra)")
    folders = [EXTENSION / "qsmkit", *[EXTENSION / m for m in MODULES]]
    out = subprocess.run([vermin, "--no-tips", "--eval-annotations", "--format", "parsable",
                          *map(str, folders)], capture_output=True, text=True, check=True).stdout
    last = out.strip().splitlines()[-1]  # ":::!2:3.10:" - the minimum over all files
    return version_tuple(last.strip(":").split(":")[-1])


def test_minimum_slicer_version_is_declared_and_true():
    declared = declared_minimums()
    assert len(set(declared.values())) == 1, declared
    minimum = version_tuple(next(iter(declared.values())))
    needed = code_minimum_python()
    assert needed >= (3, 10)  # what pyproject's requires-python says too
    assert SLICER_PYTHON[minimum] >= needed, f"Slicer {minimum} ships Python {SLICER_PYTHON[minimum]}"
    older = [v for v in SLICER_PYTHON if v < minimum]
    # the lowest such release: the one before it cannot run the code
    assert all(SLICER_PYTHON[v] < needed for v in older), (minimum, needed)
    tree = ast.parse((EXTENSION / "QSM" / "QSM.py").read_text())
    consts = {n.targets[0].id: ast.literal_eval(n.value) for n in tree.body
              if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name)
              and n.targets[0].id == "MINIMUM_PYTHON"}
    assert tuple(consts["MINIMUM_PYTHON"]) == needed


def test_extensions_index_entry():
    """QSMExtension.json in the ExtensionsIndex's current schema (catalog entry v1.0.1: required
    $schema, category, scm_url; no other keys than the schema's), agreeing with CMakeLists."""
    entry = json.loads((REPO / "QSMExtension.json").read_text())
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "build_subdirectory", "enabled", "tier"}
    assert {"$schema", "category", "scm_url"} <= set(entry) <= allowed
    assert entry["$schema"].endswith("/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json#")
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert entry["category"] == re.search(r'set\(EXTENSION_CATEGORY "([^"]*)"\)', cmake).group(1)
    homepage = re.search(r'set\(EXTENSION_HOMEPAGE "([^"#]*)', cmake).group(1)
    assert entry["scm_url"] == homepage
    assert entry["build_dependencies"] == [] and "EXTENSION_DEPENDS \"NA\"" in cmake
    assert entry["scm_type"] == "git" and 1 <= entry["tier"] <= 5
    assert entry["build_subdirectory"] == "."  # not a superbuild
    assert re.search(r"^project\(QSMExtension\)", cmake, re.M)  # the entry's file name


STOCK_ONLY = """
import importlib.abc, sys
BLOCKED = {"nibabel", "scipy", "numba", "skimage", "matplotlib", "tqdm", "slicerio", "pydicom"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("not in a stock Slicer: " + name)
sys.meta_path.insert(0, Block())
sys.path.insert(0, TESTING)
import slicer_reference
slicer = slicer_reference.load()
import importlib
for name in MODULES:
    module = importlib.import_module(name)
    getattr(module, name)(slicer_reference.module_parent())   # what Slicer does at start-up
import QSMLib.ChiStatisticsPlugin, QSMLib.jobs, QSMLib.process, QSMLib.jobrunner, QSMLib.stagewidget
hooks = [slot for signal, slot in slicer.app.connections if signal == "startupCompleted()"]
assert {h.__name__ for h in hooks} == {"registerSampleData", "registerSegmentStatisticsPlugin"}
for hook in hooks:
    hook()
import SegmentStatistics, SampleData
logic = SegmentStatistics.SegmentStatisticsLogic()      # builds every plugin's options
assert logic.getParameterNode().GetParameter("ChiStatisticsPlugin.enabled") == "True"
assert SampleData.SampleDataLogic().sourceForSampleName("QSMPhantom") is not None
import QSM
missing = QSM.QSMLogic.missingRequirements()
assert {m.split(">")[0] for m in missing} == {"scipy", "nibabel", "scikit-image", "tqdm", "numba",
                                              "matplotlib"}, missing
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not loaded, loaded
print("OK")
"""


def test_modules_import_in_a_slicer_with_only_its_stock_packages():
    """Slicer starts with the extension installed before its packages are: every module
    imports, registers its start-up hooks (Sample Data, the Segment Statistics plugin) and the
    Segment Statistics logic builds, with nibabel, scipy, numba, scikit-image, ... unimportable."""
    import slicer_reference

    slicer_reference.skip_unless_available()
    code = f"TESTING = {str(REPO / 'Testing')!r}\nMODULES = {MODULES!r}\n" + textwrap.dedent(STOCK_ONLY)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


def test_install_on_first_use_through_pip_ensure(monkeypatch):
    """Slicer's real ``slicer.packaging.pip_ensure`` asks first (declining installs nothing)
    and installs exactly the missing requirements, named as QSM's."""
    import slicer_reference

    slicer = slicer_reference.load()  # the reference's slicer.packaging and slicer.util with it
    import QSM

    fake = "qsm-surely-not-installed>=1.0"
    state = {"installed": False, "asked": [], "pip": []}
    monkeypatch.setattr(QSM.QSMLogic, "missingRequirements",
                        staticmethod(lambda: [] if state["installed"] else [fake]))

    def confirm(message, title, *args, **kwargs):
        state["asked"].append(title)
        return state["accept"]

    def pip_install(requirements, **kwargs):
        state["pip"].append(list(requirements))
        state["installed"] = True

    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", confirm)
    monkeypatch.setattr(slicer.packaging, "pip_install", pip_install)
    logic = QSM.QSMLogic()
    state["accept"] = False
    assert logic.installRequirements(askUser=True) is False and state["pip"] == []
    assert state["asked"] and "QSM" in state["asked"][0]
    state["accept"] = True
    assert logic.installRequirements(askUser=True) is True
    assert state["pip"] == [[fake]]
    assert logic.installRequirements(askUser=True) is True and len(state["pip"]) == 1
