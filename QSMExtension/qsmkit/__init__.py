"""qsmkit: Quantitative Susceptibility Mapping from gradient-echo magnitude and phase.

The public API is what ``__all__`` names, importable from ``qsmkit`` itself::

    import qsmkit
    mag = qsmkit.load_volume("magnitude.nii.gz")
    pha = qsmkit.load_volume("phase.nii.gz")
    res = qsmkit.run_pipeline(mag.data, pha.data, te=[0.02], b0=3.0,
                              voxel_size=pha.voxel_size, b0_dir=pha.b0_dir())
    qsmkit.save_volume("chi.nii.gz", res.chi, pha.affine)

These names are stable. The pipeline reads as the module names (``io``, ``geometry``,
``units``, ``dipole``, ``masking``, ``unwrapping``, ``echoes``, ``background``, ``inversion``,
``stats``, ``simulate``, ``metrics``, ``pipeline``, ``cli``), whose other contents may change
between versions. Numerics run on numpy or cupy through ``backend``. Names load on first use,
so ``import qsmkit`` stays light.
"""

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    # the whole pipeline
    "run_pipeline": "pipeline", "PipelineConfig": "pipeline", "PipelineResult": "pipeline",
    "run_pipeline_in_ras_order": "ras_order",
    # one function per stage
    "combine_coils": "api", "brain_mask": "api", "unwrap_phase": "api", "total_field": "api",
    "remove_background": "api", "invert_dipole": "api", "roi_statistics": "api",
    "find_reference": "api",
    "list_methods": "api", "method_parameters": "api",
    # files
    "Volume": "io", "load_volume": "io", "save_volume": "io",
    # the phantom and the measures against a truth
    "make_phantom": "simulate", "simulate_acquisition": "simulate", "Phantom": "simulate",
    "Acquisition": "simulate", "nrmse": "metrics", "hfen": "metrics", "ssim": "metrics",
    # bad input
    "QSMInputError": "errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qsmkit' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])
