"""Support code of the QSM modules that needs no Qt: background ``qsmkit`` processes
(:mod:`QSMLib.process`) and qsmkit commands on MRML nodes (:mod:`QSMLib.jobs`).

The Segment Statistics plugin (:mod:`QSMLib.ChiStatisticsPlugin`) needs the Slicer
application and is imported only there.
"""
