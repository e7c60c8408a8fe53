"""Every module's ``*ParameterNode`` under Slicer's real ``@parameterNodeWrapper`` (v5.12.3 sources in
../shared/slicer-reference) on a real MRML scene (slicer-core): the parameter node is created the
way the panel creates it (``logic.getParameterNode()``), every default is the one the class
declares (read from the source, independently of the wrapper), every parameter takes and gives
back each value its type allows (nodes of every allowed class, ``None`` for node parameters,
each choice, both ends of a range) and refuses what it does not, and the values live in the MRML
node (a second wrapper on the same node reads them).

A node parameter typed ``Union[A, B]`` without ``None`` cannot be created at all (Slicer writes
``None`` as its default and the union serializer refuses it), which is how the QSM and Coil
Combination panels failed in the application.
"""


import ast
import importlib
import typing

import pytest

import slicer_reference

slicer_reference.skip_unless_available()

MODULES = ["QSM", "QSMBackgroundRemoval", "QSMDipoleInversion", "QSMCoilCombination"]


@pytest.fixture
def slicer():
    return slicer_reference.load()


def declared_defaults(module_name: str, class_name: str) -> dict:
    """name -> default as written in the module's source (None where none is written)."""
    path = slicer_reference.REPO / "QSMExtension" / module_name / f"{module_name}.py"
    tree = ast.parse(path.read_text())
    consts = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                consts[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    out = {}
    for stmt in cls.body:
        if isinstance(stmt, ast.AnnAssign):
            out[stmt.target.id] = None if stmt.value is None else ast.literal_eval(stmt.value)
    return out


def split(annotation):
    """(base type, [annotations]) of an ``Annotated[...]`` or plain annotation."""
    if typing.get_origin(annotation) is typing.Annotated:
        base, *extra = typing.get_args(annotation)
        return base, extra
    return annotation, []


def node_classes(base) -> list:
    """The MRML classes a node parameter accepts (Optional/Union unwrapped), [] for non-nodes."""
    args = typing.get_args(base) if typing.get_origin(base) is typing.Union else (base,)
    return [a for a in args if isinstance(a, type) and a.__name__.startswith("vtkMRML")]


def exercise(slicer, p, name, annotation):
    """Set and read back every kind of value the parameter allows; returns the values set."""
    from slicer.parameterNodeWrapper import Choice, WithinRange

    base, extra = split(annotation)
    classes = node_classes(base)
    if classes:
        for cls in classes:
            node = slicer.mrmlScene.AddNewNodeByClass(cls.__name__, f"{name}-{cls.__name__}")
            setattr(p, name, node)
            assert getattr(p, name) is node, (name, cls)
        setattr(p, name, None)
        assert getattr(p, name) is None, name
        return
    choice = next((a for a in extra if isinstance(a, Choice)), None)
    within = next((a for a in extra if isinstance(a, WithinRange)), None)
    if choice is not None:
        for value in choice.choices:
            setattr(p, name, value)
            assert getattr(p, name) == value
        with pytest.raises(ValueError):
            setattr(p, name, "not-a-choice")
    elif within is not None:
        for value in (within.minimum, within.maximum):
            setattr(p, name, base(value))
            assert getattr(p, name) == value and type(getattr(p, name)) is base
        with pytest.raises(ValueError):
            setattr(p, name, base(within.maximum + 1))
    elif base is str:
        for value in ("", "5, 10.5 15", "lam=0.05 max_iter=10"):
            setattr(p, name, value)
            assert getattr(p, name) == value
    else:
        pytest.fail(f"{name}: no test values for {annotation!r}")


@pytest.mark.parametrize("module_name", MODULES)
def test_parameter_node_with_slicers_wrapper(slicer, module_name):
    module = importlib.import_module(module_name)
    class_name = f"{module_name}ParameterNode"
    cls = getattr(module, class_name)
    assert cls.allParameters  # the real wrapper processed it
    logic = getattr(module, f"{module_name}Logic")()
    p = logic.getParameterNode()  # what the panel does on entering the module
    assert isinstance(p, cls)

    declared = declared_defaults(module_name, class_name)
    hints = typing.get_type_hints(cls, include_extras=True)
    assert set(declared) == set(hints) == set(cls.allParameters)
    for name, default in declared.items():
        assert getattr(p, name) == default, name
    for name, annotation in hints.items():
        exercise(slicer, p, name, annotation)

    # the values are in the MRML node: a second wrapper on it reads what the first wrote
    p.setValue(next(iter(hints)), getattr(p, next(iter(hints))))
    second = cls(p.parameterNode)
    for name in hints:
        assert getattr(second, name) == getattr(p, name), name
    assert p.parameterNode.GetScene() is slicer.mrmlScene


def test_union_without_none_is_refused_by_slicers_wrapper(slicer):
    """The failure the Optional fixes: what the QSM panel had before, refused by the real code."""
    from typing import Union

    from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSequenceNode
    from slicer.parameterNodeWrapper import parameterNodeWrapper

    @parameterNodeWrapper
    class Broken:
        magnitude: Union[vtkMRMLScalarVolumeNode, vtkMRMLSequenceNode]  # noqa: UP007

    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
    with pytest.raises(TypeError, match="Unable to write value 'None'"):
        Broken(node)
