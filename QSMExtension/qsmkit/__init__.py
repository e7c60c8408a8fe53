"""qsmkit: Quantitative Susceptibility Mapping from gradient-echo magnitude and phase.

The pipeline reads as the module names: ``io`` and ``geometry`` (files, affines,
B0 direction), ``units``, ``dipole`` (kernel and forward model), ``masking``,
``unwrapping``, ``background``, ``inversion``, ``stats``, ``simulate``,
``metrics``, ``pipeline`` and ``cli``. Numerics run on numpy or cupy through
``backend``.
"""

__version__ = "0.1.0"
