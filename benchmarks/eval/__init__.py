"""Dipole-inversion evaluation suite: cases (``cases``), scoring (``score``), the QSM.rs peer
(``peers``) and the case x method table (``table``). Run it with ``make eval-inversion``
(``python -m benchmarks.eval.run``)."""
