"""Segment Statistics plugin: chi (ppm) mean, SD, median and mean relative to a reference segment.

Registered by the QSM module at application startup. In the Segment Statistics module choose the
chi map as *Scalar volume*; the plugin's options name the reference segment (default ``CSF``,
matched case-insensitively). The numbers come from
:func:`qsmkit.slicer_adapter.chi_segment_measurements` on masks that
:func:`qsmkit.slicer_adapter.segment_mask` puts on the chi map's voxel grid, the same code that
``qsmkit stats`` and the tests use.
"""

import logging
import math

import qt
import slicer
from SegmentStatisticsPlugins import SegmentStatisticsPluginBase

DEFAULT_REFERENCE = "CSF"


class ChiStatisticsPlugin(SegmentStatisticsPluginBase):
    """chi statistics per segment, referenced to a chosen segment (e.g. CSF)."""

    def __init__(self):
        super().__init__()
        self.name = "QSM chi"
        self.keys = ["chi_mean", "chi_sd", "chi_median", "chi_mean_ref"]
        self.defaultKeys = list(self.keys)
        self._cache_key = None
        self._cache = None

    # ------------------------------------------------------------ parameters

    def referenceParameterName(self):
        return self.toLongKey("referenceSegment")

    def setDefaultParameters(self, parameterNode, overwriteExisting=False):
        super().setDefaultParameters(parameterNode, overwriteExisting)
        if overwriteExisting or not parameterNode.GetParameter(self.referenceParameterName()):
            parameterNode.SetParameter(self.referenceParameterName(), DEFAULT_REFERENCE)

    def referenceSegmentName(self):
        node = self.getParameterNode()
        return (node.GetParameter(self.referenceParameterName()) if node else "") or ""

    def createDefaultOptionsWidget(self):
        super().createDefaultOptionsWidget()
        self.referenceLineEdit = qt.QLineEdit()
        self.referenceLineEdit.objectName = "chiReferenceSegmentLineEdit"
        self.referenceLineEdit.toolTip = ("Name of the reference segment (e.g. CSF); chi_mean_ref "
                                          "is each segment's mean minus this segment's mean")
        self.referenceLineEdit.text = self.referenceSegmentName()
        self.referenceLineEdit.connect("editingFinished()", self.updateParameterNodeFromGui)
        self.optionsWidget.layout().addRow("Reference segment:", self.referenceLineEdit)

    def updateGuiFromParameterNode(self, caller=None, event=None):
        super().updateGuiFromParameterNode(caller, event)
        if hasattr(self, "referenceLineEdit") and self.parameterNode:
            name = self.referenceSegmentName()
            if self.referenceLineEdit.text != name:
                self.referenceLineEdit.text = name

    def updateParameterNodeFromGui(self):
        super().updateParameterNodeFromGui()
        if hasattr(self, "referenceLineEdit") and self.parameterNode:
            self.parameterNode.SetParameter(self.referenceParameterName(),
                                            self.referenceLineEdit.text.strip())

    # ------------------------------------------------------------ computation

    def _inputs(self):
        node = self.getParameterNode()
        segmentation = slicer.mrmlScene.GetNodeByID(node.GetParameter("Segmentation"))
        chi = slicer.mrmlScene.GetNodeByID(node.GetParameter("ScalarVolume"))
        return segmentation, chi

    def _referenceMask(self, segmentation, chi):
        """(chi array, reference mask or None), cached while the nodes are unchanged."""
        from qsmkit import slicer_adapter

        name = self.referenceSegmentName()
        key = (segmentation.GetID(), segmentation.GetMTime(), chi.GetID(), chi.GetMTime(),
               chi.GetImageData().GetMTime(), name.lower())
        if key != self._cache_key:
            chiArray = slicer_adapter.array_from_volume(chi)
            reference = None
            ids = [sid for sid, n in slicer_adapter.segment_names(segmentation).items()
                   if n.lower() == name.lower()] if name else []
            if ids:
                reference = slicer_adapter.segment_mask(segmentation, ids[0], chi)
            elif name:
                logging.warning(f"QSM chi statistics: no segment named {name!r}; chi_mean_ref "
                                "is left empty")
            self._cache_key, self._cache = key, (chiArray, reference)
        return self._cache

    def computeStatistics(self, segmentID):
        from qsmkit import slicer_adapter

        requested = self.getRequestedKeys()
        if not requested:
            return {}
        segmentation, chi = self._inputs()
        if segmentation is None or chi is None or chi.GetImageData() is None:
            return {}
        chiArray, reference = self._referenceMask(segmentation, chi)
        mask = slicer_adapter.segment_mask(segmentation, segmentID, chi)
        try:
            values = slicer_adapter.chi_segment_measurements(chiArray, mask, reference)
        except Exception as err:  # e.g. a reference segment outside the chi map
            logging.warning(f"QSM chi statistics: {err}")
            values = slicer_adapter.chi_segment_measurements(chiArray, mask, None)
        return {k: values[k] for k in requested if k in values and not math.isnan(values[k])}

    def getMeasurementInfo(self, key):
        reference = self.referenceSegmentName() or "reference"
        info = {
            "chi_mean": self.createMeasurementInfo(
                name="chi mean", description="Mean magnetic susceptibility", units="ppm",
                quantityDicomCode=self.createCodedEntry("chi", "99QSM", "Magnetic susceptibility", True),
                unitsDicomCode=self.createCodedEntry("ppm", "UCUM", "parts per million", True),
                derivationDicomCode=self.createCodedEntry("373098007", "SCT", "Mean", True)),
            "chi_sd": self.createMeasurementInfo(
                name="chi SD", description="Standard deviation of susceptibility (sample)",
                units="ppm",
                unitsDicomCode=self.createCodedEntry("ppm", "UCUM", "parts per million", True),
                derivationDicomCode=self.createCodedEntry("386136009", "SCT", "Standard Deviation", True)),
            "chi_median": self.createMeasurementInfo(
                name="chi median", description="Median magnetic susceptibility", units="ppm",
                unitsDicomCode=self.createCodedEntry("ppm", "UCUM", "parts per million", True)),
            "chi_mean_ref": self.createMeasurementInfo(
                name=f"chi mean - {reference}",
                description=f"Mean susceptibility minus the mean of segment {reference}",
                units="ppm",
                unitsDicomCode=self.createCodedEntry("ppm", "UCUM", "parts per million", True)),
        }
        return info.get(key)
