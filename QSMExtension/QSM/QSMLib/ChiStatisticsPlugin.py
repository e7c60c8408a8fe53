"""Segment Statistics plugin: chi (ppm) mean, SD, median and mean relative to a reference segment.

Registered by the QSM module at application startup. In the Segment Statistics module choose the
chi map as *Scalar volume*; the plugin's options name the reference segment (default ``CSF``,
matched case-insensitively). The numbers come from
:func:`qsmkit.slicer_adapter.chi_segment_measurements` on masks that
:func:`qsmkit.slicer_adapter.segment_mask` puts on the chi map's voxel grid, the same code that
``qsmkit stats`` and the tests use.

It lives inside Slicer's Segment Statistics module, whose ``updateStatisticsForSegment`` runs
every plugin with no error handling, so this plugin:

- imports nothing of qsmkit at import time, and then only ``qsmkit.slicer_adapter``, which
  needs numpy (shipped with Slicer) and not nibabel, scipy or numba;
- measures only chi maps (:func:`qsmkit.slicer_adapter.is_chi_map`: units ppm, quantity chi or
  none recorded, as the QSM modules write them); for any other volume (a CT, an MR image, a
  field map) it returns nothing and adds no column;
- never raises into Segment Statistics: a failure is logged once and the segment gets no chi
  values, while the other plugins' values are kept.

It is enabled by default (the base class's default): for volumes that are not chi maps it adds
nothing and costs a units lookup, and for chi maps the referenced mean is the number a user of
this extension opens Segment Statistics for, which a plugin hidden behind an option would hide.
"""

import logging
import math

import qt
import slicer
from SegmentStatisticsPlugins import SegmentStatisticsPluginBase

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer before 5.4
    def _(text):
        return text

DEFAULT_REFERENCE = "CSF"


def _adapter():
    """qsmkit.slicer_adapter, or None when qsmkit cannot be imported here."""
    try:
        from qsmkit import slicer_adapter
    except Exception as err:  # noqa: BLE001 - any import failure means: do nothing
        _warn_once("import", f"QSM chi statistics unavailable: qsmkit cannot be imported ({err})")
        return None
    return slicer_adapter


_WARNED = set()


def _warn_once(key, message):
    if key not in _WARNED:
        _WARNED.add(key)
        logging.warning(message)


class ChiStatisticsPlugin(SegmentStatisticsPluginBase):
    """chi statistics per segment, referenced to a chosen segment (e.g. CSF)."""

    def __init__(self):
        super().__init__()
        self.name = "QSM chi"
        self.title = _("QSM chi")
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
        self.referenceLineEdit.toolTip = _("Name of the reference segment (e.g. CSF); chi_mean_ref "
                                           "is each segment's mean minus this segment's mean")
        self.referenceLineEdit.text = self.referenceSegmentName()
        self.referenceLineEdit.connect("editingFinished()", self.updateParameterNodeFromGui)
        self.optionsWidget.layout().addRow(_("Reference segment:"), self.referenceLineEdit)

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
        if node is None:
            return None, None
        segmentation = slicer.mrmlScene.GetNodeByID(node.GetParameter("Segmentation"))
        volume = slicer.mrmlScene.GetNodeByID(node.GetParameter("ScalarVolume"))
        return segmentation, volume

    def _referenceMask(self, adapter, segmentation, chi):
        """(chi array, reference mask or None), cached while the nodes are unchanged."""
        name = self.referenceSegmentName()
        key = (segmentation.GetID(), segmentation.GetMTime(), chi.GetID(), chi.GetMTime(),
               chi.GetImageData().GetMTime(), name.lower())
        if key != self._cache_key:
            chiArray = adapter.array_from_volume(chi)
            reference = None
            ids = [sid for sid, n in adapter.segment_names(segmentation).items()
                   if n.lower() == name.lower()] if name else []
            if ids:
                reference = adapter.segment_mask(segmentation, ids[0], chi)
            elif name:
                logging.warning(f"QSM chi statistics: no segment named {name!r}; chi_mean_ref "
                                "is left empty")
            self._cache_key, self._cache = key, (chiArray, reference)
        return self._cache

    def computeStatistics(self, segmentID):
        """The requested chi measurements of one segment; {} for a volume that is not a chi
        map, and {} (logged) when anything fails: never an exception."""
        try:
            return self._computeStatistics(segmentID)
        except Exception as err:  # noqa: BLE001 - Segment Statistics has no error handling
            _warn_once(("compute", type(err).__name__, str(err)),
                       f"QSM chi statistics skipped: {type(err).__name__}: {err}")
            return {}

    def _computeStatistics(self, segmentID):
        requested = self.getRequestedKeys()
        if not requested:
            return {}
        segmentation, chi = self._inputs()
        if segmentation is None or chi is None:
            return {}
        adapter = _adapter()
        if adapter is None or not adapter.is_chi_map(chi):
            return {}
        chiArray, reference = self._referenceMask(adapter, segmentation, chi)
        mask = adapter.segment_mask(segmentation, segmentID, chi)
        try:
            values = adapter.chi_segment_measurements(chiArray, mask, reference)
        except Exception as err:  # noqa: BLE001 - e.g. a reference segment outside the chi map
            logging.warning(f"QSM chi statistics: {err}")
            values = adapter.chi_segment_measurements(chiArray, mask, None)
        return {k: values[k] for k in requested if k in values and not math.isnan(values[k])}

    def getMeasurementInfo(self, key):
        """Name (not translated), title, description and units of a measurement, as
        ``ScalarVolumeSegmentStatisticsPlugin`` gives them; None for an unknown key."""
        if key not in self.keys:
            return None
        reference = self.referenceSegmentName() or _("reference")
        ppm = self.createCodedEntry("ppm", "UCUM", "parts per million", True)
        chi = self.createCodedEntry("chi", "99QSM", "Magnetic susceptibility", True)
        info = {
            "chi_mean": dict(
                name="chi mean", title=_("chi mean"),
                description=_("Mean magnetic susceptibility within the segment."),
                derivationDicomCode=self.createCodedEntry("373098007", "SCT", "Mean", True)),
            "chi_sd": dict(
                name="chi SD", title=_("chi SD"),
                description=_("Standard deviation (sample) of the susceptibility within the segment."),
                derivationDicomCode=self.createCodedEntry("386136009", "SCT", "Standard Deviation", True)),
            "chi_median": dict(
                name="chi median", title=_("chi median"),
                description=_("Median magnetic susceptibility within the segment."),
                derivationDicomCode=self.createCodedEntry("373099004", "SCT", "Median", True)),
            "chi_mean_ref": dict(
                name="chi mean relative to reference",
                title=_("chi mean - {reference}").format(reference=reference),
                description=_("Mean susceptibility minus the mean of segment {reference}.").format(
                    reference=reference)),
        }[key]
        return self.createMeasurementInfo(units="ppm", quantityDicomCode=chi, unitsDicomCode=ppm, **info)
