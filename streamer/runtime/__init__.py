"""The daemon's pieces, each a class that owns its state and is handed its collaborators.

``ingest`` (consumed batch -> rings and dead letters), ``publisher`` (scored batches ->
records, in order), ``rounds`` (the commit round, over narrow Protocols),
``checkpoint`` and ``state`` (per-sensor state records), ``partitions`` and
``eviction`` (which sensors are held where, and which go), ``recovery`` (restore on
assignment), ``backpressure``, ``startup`` (cluster checks), ``ops`` (metrics server,
watchdog, access refusals, reloads, gauges), ``heap`` and ``logs``. ``streamer.daemon``
wires them together and runs the loop.
"""
