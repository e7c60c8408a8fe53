"""One set of data arguments (``registry.DATA_ARGUMENTS``) with one meaning: a keyword that
``qsmkit methods`` lists is one that ``--*-param`` accepts, and one it hides is refused."""

import inspect

import pytest

from qsmkit.api import _registry
from qsmkit.echoes import fit_field
from qsmkit.errors import QSMInputError
from qsmkit.registry import DATA_ARGUMENTS, method_parameters, validate_params

STAGES = ("masking", "unwrapping", "background", "inversion", "combination")


def _methods():
    for stage in STAGES:
        reg = _registry(stage)
        for name in reg.names():
            yield f"{stage} {name}", reg._methods[name].func
    yield "field fit", fit_field


def _refused_as_data(func, key):
    """Whether ``--param key=...`` is refused as set by qsmkit itself (any value)."""
    try:
        validate_params(func, {key: 1.0}, "--param", "x")
    except QSMInputError as err:
        return "set by qsmkit itself" in str(err)
    return False


@pytest.mark.parametrize("what, func", list(_methods()), ids=lambda v: v if isinstance(v, str) else "")
def test_listed_parameters_are_exactly_the_settable_ones(what, func):
    listed = {p.name for p in method_parameters(func) if not p.name.startswith("**")}
    for p in inspect.signature(func).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        hidden = p.name not in listed
        assert hidden == _refused_as_data(func, p.name), f"{what}: {p.name}"
        assert hidden == (p.name in DATA_ARGUMENTS or p.default is p.empty), f"{what}: {p.name}"


def test_the_old_disagreements():
    """``te`` (echo times come from --te) is data everywhere; FOCUSS's ``noise_sd_ppm`` (a number
    the user may know) is a listed, settable parameter; ``unwrap`` and ``b0`` stay refused."""
    reg = {s: _registry(s) for s in STAGES}
    focuss = reg["inversion"]._methods["focuss"].func
    assert "noise_sd_ppm" in {p.name for p in method_parameters(focuss)}
    assert validate_params(focuss, {"noise_sd_ppm": 0.01}, "--inversion-param", "focuss") == \
        {"noise_sd_ppm": 0.01}
    for func in (reg["unwrapping"]._methods["romeo"].func,
                 reg["combination"]._methods["mcpc3ds"].func):
        assert "te" not in {p.name for p in method_parameters(func)}
        with pytest.raises(QSMInputError, match="te: set by qsmkit itself"):
            validate_params(func, {"te": 0.01}, "--param", "x")
    for key in ("unwrap", "b0"):
        with pytest.raises(QSMInputError, match="set by qsmkit itself"):
            validate_params(fit_field, {key: 1.0}, "--field-param", "the field fit")


def test_numbers_whose_default_is_a_word():
    """``tv``'s ``alpha`` (default "auto") takes a number or its words, and ``edge_fraction``
    (default 0.3) a number, "voxel" (the thick-slice share), "size" (by the voxel edge) or "noise"
    (from the magnitude's noise); other text is refused."""
    tv = _registry("inversion")._methods["tv"].func
    opt = "--inversion-param"
    assert validate_params(tv, {"alpha": 0.002}, opt, "tv") == {"alpha": 0.002}
    assert validate_params(tv, {"alpha": "lcurve"}, opt, "tv") == {"alpha": "lcurve"}
    assert validate_params(tv, {"edge_fraction": 0.3}, opt, "tv") == {"edge_fraction": 0.3}
    assert validate_params(tv, {"edge_fraction": "voxel"}, opt, "tv") == {"edge_fraction": "voxel"}
    assert validate_params(tv, {"edge_fraction": "size"}, opt, "tv") == {"edge_fraction": "size"}
    assert validate_params(tv, {"edge_fraction": "noise"}, opt, "tv") == {"edge_fraction": "noise"}
    for key, bad in (("alpha", "big"), ("edge_fraction", "many")):
        with pytest.raises(QSMInputError, match=f"{key}={bad}: tv expects a finite number or"):
            validate_params(tv, {key: bad}, opt, "tv")
