"""The whole pipeline on arrays in a file's voxel order, run in the order closest to RAS.

``qsmkit run``, ``qsmkit batch`` and the Slicer adapter all call :func:`run_pipeline_in_ras_order`:
the stages discretise with forward differences and stop their iterative solvers early, so
two exports of one scan that store the voxels in different orders (a scanner's DICOM and
dcm2niix's NIfTI of the Philips head) gave chi maps 7.7 % apart until every entry point ran
the stages in one order (``geometry.CanonicalOrder``) and put the results back in the
file's.
"""

from __future__ import annotations

from dataclasses import replace

from . import geometry

#: the ``PipelineResult`` fields that are images on the voxel grid
_IMAGES = ("mask", "field_total", "field_local", "local_mask", "chi", "reference_region")


def run_pipeline_in_ras_order(magnitude, phase, te, b0, affine, *, b0_world=None, mask=None,
                              config=None, progress=None, reference_region=None, apodize=0.0):
    """:func:`qsmkit.pipeline.run_pipeline` on ``magnitude``/``phase`` (file order, echoes
    last) with the voxel grid ``affine`` (IJK to RAS mm): inputs are reordered to the voxel
    order closest to RAS, the voxel size and the B0 direction are read off the reordered
    affine (``b0_world`` overrides scanner z), and every image of the result comes back in
    the file's order. ``apodize`` (``kspace.apodize``'s Tukey fraction) windows the phase
    before the stages. Returns ``(result, order)``; ``order`` (``CanonicalOrder``) maps
    the file's arrays to the order the stages saw, e.g. for a QC figure."""
    from . import kspace
    from .pipeline import run_pipeline

    order = geometry.CanonicalOrder(affine, magnitude.shape)
    mag = order.forward(magnitude)
    pha = order.forward(phase)
    if apodize:  # the phase only: masking and priors keep the sharp magnitude
        pha = kspace.apodize(mag, pha, apodize)[1]
    res = run_pipeline(mag, pha, te, b0, geometry.voxel_size(order.canonical_affine),
                       geometry.b0_direction(order.canonical_affine, b0_world),
                       mask=order.forward(mask), config=config, progress=progress,
                       reference_region=order.forward(reference_region))
    return replace(res, **{n: order.back(getattr(res, n)) for n in _IMAGES}), order
