"""The engine: the only code that submits work to Dask.

:mod:`.graph` runs a DE run's tasks, :mod:`.calibration` the planner's measurements on the
workers, :mod:`.reductions` the plots' group sums over a store, and :mod:`.cluster`
resolves the client they run on.
"""
