"""Static checks of the Slicer scripted modules, without Slicer.

For every module folder under QSMExtension/ whose CMakeLists.txt calls
slicerMacroBuildScriptedModule: every file listed in CMake exists and every script and
resource in the folder is listed; globs match files; each Python file parses; the main script
defines the template's classes (module, parameterNodeWrapper parameters, widget, logic, test);
every .ui parses; every widget the code reaches through ``self.ui.NAME`` and every connection
in the .ui names an existing widget; every ``SlicerParameterName`` is a field of the parameter
class (combo boxes bound to Choice fields); resource paths in the code exist. The checker is
run on a modified copy to show it fails when a widget, a file or a parameter is renamed.
"""

from __future__ import annotations

import ast
import glob
import re
import shutil
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXTENSION = REPO / "QSMExtension"
TEMPLATE_BASES = {
    "": "ScriptedLoadableModule",
    "Widget": "ScriptedLoadableModuleWidget",
    "Logic": "ScriptedLoadableModuleLogic",
    "Test": "ScriptedLoadableModuleTest",
}


# ---------------------------------------------------------------- CMake

def _strip_cmake_comments(text: str) -> str:
    return "\n".join(re.sub(r"(?<!\$)#.*$", "", line) for line in text.splitlines())


def parse_cmake(path: Path) -> dict:
    """Variables set with set(NAME values...), ${...} expanded (CMAKE_CURRENT_SOURCE_DIR too),
    the arguments of slicerMacroBuildScriptedModule and the file(GLOB ...) calls."""
    text = _strip_cmake_comments(path.read_text())
    variables = {"CMAKE_CURRENT_SOURCE_DIR": [str(path.parent)]}

    def expand(token):
        out = [token]
        for _ in range(5):
            new = []
            for t in out:
                m = re.search(r"\$\{(\w+)\}", t)
                if not m:
                    new.append(t)
                    continue
                values = variables.get(m.group(1), [""])
                new.extend(t[:m.start()] + v + t[m.end():] for v in values)
            out = new
        return out

    def args(body):
        return [a for token in body.split() for a in expand(token.strip('"'))]

    for m in re.finditer(r"\bset\(\s*(\w+)\s*([^)]*)\)", text):
        variables[m.group(1)] = args(m.group(2))
    call = re.search(r"slicerMacroBuildScriptedModule\(([^)]*)\)", text)
    build = {}
    if call:
        key = None
        for a in args(call.group(1)):
            if a in ("NAME", "SCRIPTS", "RESOURCES"):
                key = a
                build[key] = []
            elif a in ("WITH_GENERIC_TESTS", "WITH_SUBDIR", "VERBOSE"):
                key = None
            elif key:
                build[key].append(a)
    globs = []
    for m in re.finditer(r"\bfile\(\s*GLOB\s+(\w+)\s+(?:RELATIVE\s+(\S+)\s+)?([^)]*)\)", text):
        globs.append((m.group(1), [p for t in m.group(3).split() for p in expand(t)]))
    return {"variables": variables, "build": build, "globs": globs}


# ---------------------------------------------------------------- Python

def _class_bases(node: ast.ClassDef) -> list:
    names = []
    for b in node.bases:
        if isinstance(b, ast.Name):
            names.append(b.id)
        elif isinstance(b, ast.Attribute):
            names.append(b.attr)
    return names


def _decorators(node: ast.ClassDef) -> list:
    out = []
    for d in node.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        out.append(target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", ""))
    return out


def parameter_fields(tree: ast.Module) -> dict:
    """Fields of each @parameterNodeWrapper class: class name -> {field: annotation source}."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and "parameterNodeWrapper" in _decorators(node):
            out[node.name] = {s.target.id: ast.unparse(s.annotation) for s in node.body
                              if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    return out


def ui_references(tree: ast.Module) -> set:
    """NAME for every expression ``<anything>.ui.NAME``."""
    return {n.attr for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute)
            and n.value.attr == "ui"}


def resource_paths(tree: ast.Module) -> set:
    """String arguments of ``*.resourcePath("...")`` calls."""
    return {n.args[0].value for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr == "resourcePath" and n.args and isinstance(n.args[0], ast.Constant)}


def module_constants(tree: ast.Module) -> dict:
    """Module-level NAME = [literal list] assignments."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return out


# ---------------------------------------------------------------- .ui

def ui_info(path: Path) -> dict:
    root = ET.parse(path).getroot()
    widgets = {w.get("name"): w.get("class") for w in root.iter("widget")}
    widgets.update({a.get("name"): "QAction" for a in root.iter("action")})
    bindings = []
    for w in root.iter("widget"):
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                bindings.append((w.get("name"), w.get("class"), (p.findtext("string") or "").strip()))
    connections = [(c.findtext("sender"), c.findtext("receiver")) for c in root.iter("connection")]
    top = root.find("widget")
    return {"root": root.tag, "widgets": widgets, "bindings": bindings, "connections": connections,
            "top": (top.get("class"), top.get("name")) if top is not None else (None, None)}


# ---------------------------------------------------------------- the checker

def check_module(module_dir: Path) -> list:
    """Problems found in one scripted module folder (empty list: all good)."""
    problems = []
    cmake = module_dir / "CMakeLists.txt"
    if not cmake.is_file():
        return [f"{module_dir.name}: no CMakeLists.txt"]
    info = parse_cmake(cmake)
    build = info["build"]
    name = (build.get("NAME") or [""])[0]
    if not build or not name:
        return [f"{cmake}: no slicerMacroBuildScriptedModule(NAME ...) call"]
    scripts, resources = build.get("SCRIPTS", []), build.get("RESOURCES", [])
    if f"{name}.py" not in scripts:
        problems.append(f"{cmake}: the main script {name}.py is not in SCRIPTS")
    for f in scripts + resources:
        if not (module_dir / f).is_file():
            problems.append(f"{cmake}: listed file {f} does not exist")
    listed = {str(Path(f)) for f in scripts + resources}
    on_disk = [p for p in module_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts
               and p.name != "CMakeLists.txt" and "Testing" not in p.relative_to(module_dir).parts]
    for p in on_disk:
        rel = str(p.relative_to(module_dir))
        if (p.suffix == ".py" or rel.startswith("Resources")) and rel not in listed:
            problems.append(f"{cmake}: {rel} is in the module folder but not listed")
    for var, patterns in info["globs"]:
        for pattern in patterns:
            if not glob.glob(pattern):
                problems.append(f"{cmake}: file(GLOB {var}) pattern {pattern} matches no file")

    trees = {}
    for f in scripts:
        path = module_dir / f
        if path.is_file():
            try:
                trees[f] = ast.parse(path.read_text(), filename=str(path))
            except SyntaxError as err:
                problems.append(f"{path}: does not parse ({err.msg}, line {err.lineno})")
    main = trees.get(f"{name}.py")
    if main is None:
        return problems
    classes = {n.name: _class_bases(n) for n in main.body if isinstance(n, ast.ClassDef)}
    for suffix, base in TEMPLATE_BASES.items():
        cls = name + suffix
        if cls not in classes:
            problems.append(f"{name}.py: class {cls} is missing")
        elif base not in classes[cls]:
            problems.append(f"{name}.py: class {cls} does not derive from {base}")
    params = parameter_fields(main)
    if not params:
        problems.append(f"{name}.py: no @parameterNodeWrapper parameter class")
    fields = {k: v for cls_fields in params.values() for k, v in cls_fields.items()}

    for rel in resource_paths(main):
        if not (module_dir / "Resources" / rel).is_file():
            problems.append(f"{name}.py: resourcePath({rel!r}) does not exist")
        elif f"Resources/{rel}" not in resources:
            problems.append(f"{name}.py: resource {rel} is used but not listed in CMake")

    uis = [module_dir / f for f in resources if f.endswith(".ui")]
    widgets = {}
    for ui in uis:
        if not ui.is_file():
            continue
        try:
            u = ui_info(ui)
        except ET.ParseError as err:
            problems.append(f"{ui.name}: not valid XML ({err})")
            continue
        if u["root"] != "ui":
            problems.append(f"{ui.name}: root element is <{u['root']}>, not <ui>")
        if ui.stem == name and u["top"] != ("qMRMLWidget", name):
            problems.append(f"{ui.name}: top widget is {u['top']}, expected a qMRMLWidget named {name}")
        widgets.update(u["widgets"])
        for sender, receiver in u["connections"]:
            for w in (sender, receiver):
                if w not in u["widgets"]:
                    problems.append(f"{ui.name}: a connection names widget {w!r}, which does not exist")
        seen = {}
        for widget, cls, param in u["bindings"]:
            if param not in fields:
                problems.append(f"{ui.name}: widget {widget} has SlicerParameterName {param!r}, "
                                f"not a field of {', '.join(params) or 'the parameter class'}")
                continue
            if param in seen:
                problems.append(f"{ui.name}: parameter {param!r} bound twice ({seen[param]}, {widget})")
            seen[param] = widget
            if cls == "QComboBox" and "Choice" not in fields[param] and "Enum" not in fields[param]:
                problems.append(f"{ui.name}: combo box {widget} is bound to {param!r}, which is "
                                "not a Choice or an enum")
    for ref in sorted(ui_references(main)):
        if ref not in widgets:
            problems.append(f"{name}.py: self.ui.{ref} is not a widget in "
                            f"{', '.join(u.name for u in uis) or 'any .ui file'}")
    return problems


def module_dirs() -> list:
    return sorted(p.parent for p in EXTENSION.glob("*/CMakeLists.txt")
                  if "slicerMacroBuildScriptedModule" in p.read_text())


# ---------------------------------------------------------------- the modules as they are

def test_modules_exist():
    """The pipeline module and the stage modules, each added by the top-level CMakeLists."""
    names = [d.name for d in module_dirs()]
    assert {"QSM", "QSMBackgroundRemoval", "QSMDipoleInversion", "QSMCoilCombination"} <= set(names)
    top = _strip_cmake_comments((REPO / "CMakeLists.txt").read_text())
    added = set(re.findall(r"add_subdirectory\(\s*QSMExtension/(\w+)\s*\)", top))
    assert added == set(names)


@pytest.mark.parametrize("module_dir", module_dirs(), ids=lambda p: p.name)
def test_module_static_checks(module_dir):
    assert check_module(module_dir) == []


def test_qsm_bundles_qsmkit():
    info = parse_cmake(EXTENSION / "QSM" / "CMakeLists.txt")
    (var, patterns), = [g for g in info["globs"] if g[0] == "QSMKIT_PYTHON_SCRIPTS"]
    files = {Path(f).name for p in patterns for f in glob.glob(p)}
    assert {"__init__.py", "cli.py", "slicer_adapter.py", "pipeline.py"} <= files
    assert "ctkMacroCompilePythonScript" in (EXTENSION / "QSM" / "CMakeLists.txt").read_text()


def test_qsm_method_choices_are_qsmkit_methods():
    """The panel offers only methods the command line accepts (and says which it lacks)."""
    import qsmkit.fsl  # noqa: F401  (registers bet and prelude)
    from qsmkit.background import BACKGROUND
    from qsmkit.inversion import INVERSION
    from qsmkit.masking import MASKING
    from qsmkit.unwrapping import UNWRAPPING

    consts = module_constants(ast.parse((EXTENSION / "QSM" / "QSM.py").read_text()))
    for const, registry in (("MASKING_CHOICES", MASKING), ("UNWRAPPING_CHOICES", UNWRAPPING),
                            ("BACKGROUND_CHOICES", BACKGROUND), ("INVERSION_CHOICES", INVERSION)):
        offered, known = consts[const], registry.choices()
        assert offered[0] == "auto" and set(offered) <= set(known), (const, offered, known)
        if set(known) - set(offered):
            warnings.warn(f"QSM.py {const} lacks {sorted(set(known) - set(offered))}", stacklevel=1)
    assert consts["DEVICE_CHOICES"] == ["auto", "cpu", "gpu"]


def test_coil_combination_choices_are_qsmkit_methods():
    from qsmkit.coils import COMBINATION

    tree = ast.parse((EXTENSION / "QSMCoilCombination" / "QSMCoilCombination.py").read_text())
    offered = module_constants(tree)["COMBINATION_CHOICES"]
    assert offered[0] == "auto" and set(offered[1:]) == set(COMBINATION.names())


def test_qsm_parameter_defaults_are_choices():
    tree = ast.parse((EXTENSION / "QSM" / "QSM.py").read_text())
    consts = module_constants(tree)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "QSMParameterNode")
    for stmt in cls.body:
        if isinstance(stmt, ast.AnnAssign) and "Choice(" in ast.unparse(stmt.annotation):
            const = re.search(r"Choice\((\w+)\)", ast.unparse(stmt.annotation)).group(1)
            assert ast.literal_eval(stmt.value) in consts[const], stmt.target.id


def test_chi_statistics_plugin_shape():
    """A SegmentStatisticsPluginBase subclass whose keys are the adapter's measurements."""
    from qsmkit.slicer_adapter import CHI_MEASUREMENTS

    tree = ast.parse((EXTENSION / "QSM" / "QSMLib" / "ChiStatisticsPlugin.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef))
    assert "SegmentStatisticsPluginBase" in _class_bases(cls)
    methods = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
    assert {"computeStatistics", "getMeasurementInfo", "__init__"} <= methods
    keys = next(ast.literal_eval(n.value) for n in ast.walk(cls) if isinstance(n, ast.Assign)
                and isinstance(n.targets[0], ast.Attribute) and n.targets[0].attr == "keys")
    assert tuple(keys) == CHI_MEASUREMENTS
    main = (EXTENSION / "QSM" / "QSM.py").read_text()
    assert "SegmentStatisticsLogic.registerPlugin(ChiStatisticsPlugin())" in main


def test_nothing_installs_packages_at_import():
    """pip_install is only called inside functions (on Apply, after asking), never at import."""
    for module_dir in module_dirs():
        for path in module_dir.rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in tree.body:  # module-level statements only
                if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                    continue
                assert "pip_install" not in ast.unparse(node), f"{path}: pip_install at import"


# ---------------------------------------------------------------- the checker catches breakage

@pytest.fixture
def module_copy(tmp_path):
    """A copy of the QSM module (and of qsmkit, which its CMake globs) to break on purpose."""
    shutil.copytree(EXTENSION / "QSM", tmp_path / "QSM",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(EXTENSION / "qsmkit", tmp_path / "qsmkit",
                    ignore=shutil.ignore_patterns("__pycache__"))
    copy = tmp_path / "QSM"
    assert check_module(copy) == []
    return copy


def edit(path: Path, old: str, new: str):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_renamed_widget_fails(module_copy):
    edit(module_copy / "Resources" / "UI" / "QSM.ui", 'name="applyButton"', 'name="runButton"')
    problems = check_module(module_copy)
    assert any("self.ui.applyButton" in p for p in problems), problems


def test_renamed_widget_in_a_connection_fails(module_copy):
    edit(module_copy / "Resources" / "UI" / "QSM.ui", 'name="magnitudeSelector"',
         'name="magSelector"')
    problems = check_module(module_copy)
    assert any("'magnitudeSelector'" in p and "connection" in p for p in problems), problems


def test_renamed_parameter_fails(module_copy):
    edit(module_copy / "QSM.py", "    echoTimesMs: str", "    echoTimes: str")
    problems = check_module(module_copy)
    assert any("'echoTimesMs'" in p for p in problems), problems


def test_renamed_file_fails(module_copy):
    icon = module_copy / "Resources" / "Icons" / "QSM.png"
    icon.rename(icon.with_name("QSM-icon.png"))
    problems = check_module(module_copy)
    assert any("Resources/Icons/QSM.png does not exist" in p for p in problems), problems
    assert any("QSM-icon.png is in the module folder but not listed" in p for p in problems)


def test_unlisted_script_and_missing_glob_fail(module_copy):
    (module_copy / "QSMLib" / "extra.py").write_text("x = 1\n")
    shutil.rmtree(module_copy.parent / "qsmkit")
    problems = check_module(module_copy)
    assert any("QSMLib/extra.py is in the module folder but not listed" in p for p in problems)
    assert any("matches no file" in p for p in problems), problems


def test_broken_python_ui_and_classes_fail(module_copy):
    edit(module_copy / "QSM.py", "class QSMLogic(ScriptedLoadableModuleLogic):",
         "class QSMLogic(object):")
    (module_copy / "QSMLib" / "jobs.py").write_text("def broken(:\n")
    edit(module_copy / "Resources" / "UI" / "QSM.ui", "</ui>", "")
    problems = check_module(module_copy)
    assert any("QSMLogic does not derive from ScriptedLoadableModuleLogic" in p for p in problems)
    assert any("jobs.py: does not parse" in p for p in problems)
    assert any("QSM.ui: not valid XML" in p for p in problems), problems


def test_combo_bound_to_plain_string_fails(module_copy):
    edit(module_copy / "QSM.py", 'inversion: Annotated[str, Choice(INVERSION_CHOICES)] = "auto"',
         'inversion: str = "auto"')
    problems = check_module(module_copy)
    assert any("inversionComboBox" in p and "Choice" in p for p in problems), problems


@pytest.mark.parametrize("module_dir", module_dirs(), ids=lambda p: p.name)
def test_apply_starts_the_job_once_with_progress(module_dir):
    """Each logic's ``startFromParameterNode`` (what Apply calls) makes one stage call with
    ``wait=False`` - which starts the job - passing onLine and onProgress through, and does not
    start it a second time (``startJob``)."""
    tree = ast.parse((module_dir / f"{module_dir.name}.py").read_text())
    funcs = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
             and n.name == "startFromParameterNode"]
    assert len(funcs) == 1, module_dir.name
    calls = [c for c in ast.walk(funcs[0]) if isinstance(c, ast.Call)]
    assert not any(isinstance(c.func, ast.Attribute) and c.func.attr == "startJob" for c in calls)
    starting = [c for c in calls if any(k.arg == "wait" and isinstance(k.value, ast.Constant)
                                        and k.value.value is False for k in c.keywords)]
    assert len(starting) == 1, module_dir.name
    assert {"onLine", "onProgress"} <= {k.arg for k in starting[0].keywords}
