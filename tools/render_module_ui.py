"""Render a module's .ui to a PNG without Slicer, for the README's screenshot.

Slicer's own widgets are replaced by the closest plain Qt widget before loading (qMRMLWidget ->
QWidget, ctkCollapsibleButton -> QGroupBox, qMRMLNodeComboBox -> QComboBox showing a node name,
ctkDirectoryButton -> QPushButton), so the picture shows the panel's real layout, labels, tool
tips' widgets and choices, but not Slicer's styling. Needs PyQt5 (not a project dependency):

    python -m venv /tmp/qtenv && /tmp/qtenv/bin/pip install PyQt5
    QT_QPA_PLATFORM=offscreen /tmp/qtenv/bin/python tools/render_module_ui.py \
        QSMExtension/QSM/Resources/UI/QSM.ui Resources/Screenshots/qsm-module.png \
        --set magnitudeSelector=QSMPhantom_magnitude phaseSelector=QSMPhantom_phase
"""

import argparse
import ast
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

STAND_INS = {"qMRMLWidget": "QWidget", "ctkCollapsibleButton": "QGroupBox",
             "qMRMLNodeComboBox": "QComboBox", "ctkDirectoryButton": "QPushButton"}


def plain_qt_ui(path: Path) -> str:
    root = ET.parse(path).getroot()
    for w in root.iter("widget"):
        cls = w.get("class")
        if cls == "ctkCollapsibleButton":
            collapsed = any(p.get("name") == "collapsed" and p.findtext("bool") == "true"
                            for p in w.findall("property"))
            for p in w.findall("property"):
                if p.get("name") == "text":
                    mark = "\u25b8 " if collapsed else "\u25be "
                    p.find("string").text = mark + (p.findtext("string") or "")
            if collapsed:  # a collapsed section shows its title only
                for layout in w.findall("layout"):
                    w.remove(layout)
        if cls in STAND_INS:
            w.set("class", STAND_INS[cls])
            for p in list(w.findall("property")):
                if p.get("name") == "text" and cls == "ctkCollapsibleButton":
                    p.set("name", "title")
                elif p.get("name") not in ("toolTip", "geometry", "text", "enabled"):
                    w.remove(p)
    for tag in ("customwidgets", "connections"):
        for el in root.findall(tag):
            root.remove(el)
    return ET.tostring(root, encoding="unicode")


def choices(module_py: Path) -> dict:
    """Module-level NAME = [...] lists of the module script (the panel's combo-box choices)."""
    out = {}
    for node in ast.parse(module_py.read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                continue
            if isinstance(value, list):
                out[node.targets[0].id] = value
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("ui")
    ap.add_argument("png")
    ap.add_argument("--set", nargs="*", default=[], metavar="WIDGET=TEXT")
    ap.add_argument("--progress", type=int, help="show the progress bar at this percentage")
    ap.add_argument("--status", default="")
    ap.add_argument("--width", type=int, default=420)
    args = ap.parse_args(argv)

    from PyQt5 import QtWidgets, uic

    app = QtWidgets.QApplication(sys.argv[:1])
    app.setStyle("Fusion")
    with tempfile.NamedTemporaryFile("w", suffix=".ui", delete=False) as fh:
        fh.write(plain_qt_ui(Path(args.ui)))
    panel = uic.loadUi(fh.name)
    values = dict(item.split("=", 1) for item in args.set)
    for combo in panel.findChildren(QtWidgets.QComboBox):
        name = combo.objectName()
        if name in values:
            combo.addItem(values[name])
    for name, text in values.items():
        w = panel.findChild(QtWidgets.QWidget, name)
        if isinstance(w, QtWidgets.QLineEdit):
            w.setText(text)
        elif isinstance(w, QtWidgets.QDoubleSpinBox):
            w.setValue(float(text))
        elif isinstance(w, QtWidgets.QLabel):
            w.setText(text)
    bar = panel.findChild(QtWidgets.QProgressBar, "progressBar")
    if bar is not None:
        bar.setVisible(args.progress is not None)
        bar.setValue(args.progress or 0)
    if args.progress is not None:  # running: Apply disabled, Cancel enabled
        for name, enabled in (("applyButton", False), ("cancelButton", True)):
            button = panel.findChild(QtWidgets.QPushButton, name)
            if button is not None:
                button.setEnabled(enabled)
    status = panel.findChild(QtWidgets.QLabel, "statusLabel")
    if status is not None:
        status.setText(args.status)
    panel.resize(args.width, panel.sizeHint().height())
    panel.show()
    app.processEvents()
    panel.grab().save(args.png)
    print(f"wrote {args.png} ({panel.width()}x{panel.height()})")


if __name__ == "__main__":
    main()
