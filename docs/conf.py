"""Sphinx configuration: the qsmkit API reference, built from the numpy-style docstrings.

Sphinx rather than mkdocs: autodoc imports the package and reads the docstrings where they
are, and napoleon (part of Sphinx) reads the numpy style the code is written in, so the
reference needs no extra plugin and no copy of any signature. ``make docs`` builds it.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "QSMExtension")))

import qsmkit  # noqa: E402

project = "qsmkit"
author = "QSMExtension developers"
release = version = qsmkit.__version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
napoleon_google_docstring = False
napoleon_numpy_docstring = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
exclude_patterns = ["_build"]
html_theme = "alabaster"
