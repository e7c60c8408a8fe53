"""Support code of the QSM modules that needs no Qt: background ``qsmkit`` processes
(:mod:`QSMLib.process`) and qsmkit commands on MRML nodes (:mod:`QSMLib.jobs`).

The Segment Statistics plugin (:mod:`QSMLib.ChiStatisticsPlugin`), the panels' job runner
(:mod:`QSMLib.jobrunner`) and the stage panels' shared plumbing (:mod:`QSMLib.stagewidget`) need
the Slicer application and are imported only there.
"""
