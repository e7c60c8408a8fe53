"""Score a susceptibility map against a case's truth: one flat dict per (case, truth, method).

- QSM-CI's own scorer (``qsm_ci.qsm_eval.score_arrays``, qsm-ci 0.6.2, the QSM-CI leaderboard's
  numbers): ``nrmse`` (%, demeaned in the mask), ``nrmse_detrend``, ``hfen``, ``xsim``,
  ``correlation`` and, where the case has a QSM-CI segmentation (head cases), ``nrmse_dgm``,
  ``nrmse_tissue``, ``nrmse_blood`` and ``dgm_linearity`` (|1 - slope| over the 6 nuclei).
- The 2016 challenge's RMSE (``challenge_rmse``, %): 100 ||x M - ref|| / ||ref|| over the whole
  volume, no means removed (FANSI's ``compute_rmse`` as the challenge's evaluation script calls it).
- Deep-gray ROI statistics: each ROI's mean relative to the reference region's mean (CSF where
  the case has one, else the whole mask), in ppb, for the map and for the truth; ``roi_slope``
  (least-squares slope of map means against truth means), ``roi_mae_ppb`` (mean |difference|).
Both maps are first taken relative to their mean in the mask (chi is defined up to a constant;
XSIM, unlike NRMSE, would otherwise score an offset).

- ``vessel``: contrast recovery of the magic-angle vein (our phantom).
"""

from __future__ import annotations

import numpy as np


def roi_means_ppb(chi, case):
    """{roi: mean chi in the ROI minus the reference region's mean, ppb} (ROIs inside the mask)."""
    if case.labels is None or not case.rois:
        return {}
    chi = np.asarray(chi, np.float64)
    m = case.mask
    ref = m if case.reference is None else (m & (case.labels == case.reference))
    if ref.sum() < 20:
        ref = m
    base = chi[ref].mean()
    out = {}
    for name, lab in case.rois.items():
        r = m & (case.labels == lab)
        if r.sum() >= 5:
            out[name] = 1000.0 * float(chi[r].mean() - base)
    return out


def challenge_rmse(x, ref, mask):
    x = np.asarray(x, np.float64) * mask
    ref = np.asarray(ref, np.float64)
    return float(100 * np.linalg.norm(x - ref) / np.linalg.norm(ref))


def score(chi, case, truth_name):
    """Flat dict of measures of ``chi`` against ``case.truths[truth_name]``."""
    from qsm_ci.qsm_eval import score_arrays

    from qsmkit import metrics

    m = case.mask
    truth = np.asarray(case.truths[truth_name], np.float64)
    chi = np.asarray(chi, np.float64)
    # chi is determined only up to a constant: both maps relative to their mean in the mask, so
    # XSIM (which, unlike NRMSE, does not remove means) does not score an offset
    truth = np.where(m, truth - truth[m].mean(), 0)
    chi = np.where(m, chi - chi[m].mean(), 0)
    seg = None if case.seg is None else np.asarray(case.seg, np.int32)
    qsmci, _ = score_arrays(chi, truth, case.mask.astype(np.uint8), kind="chi", seg=seg)
    row = {k: (float(v) if v is not None else None) for k, v in qsmci.items()}
    row["challenge_rmse"] = challenge_rmse(chi, truth, case.mask)
    ours, ref = roi_means_ppb(chi, case), roi_means_ppb(truth, case)
    if len(ref) >= 2:
        a = np.array([ref[k] for k in ref])
        b = np.array([ours[k] for k in ref])
        row["roi_slope"] = float(np.polyfit(a, b, 1)[0])
        row["roi_mae_ppb"] = float(np.mean(np.abs(a - b)))
        row["roi_means_ppb"] = {k: round(ours[k], 1) for k in ref}
        row["roi_truth_ppb"] = {k: round(ref[k], 1) for k in ref}
    if case.vessel is not None:
        row["vessel"] = float(metrics.vessel_contrast_recovery(chi, truth, case.vessel))
    return row
