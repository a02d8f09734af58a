"""The suites and helpers of the end-to-end benchmark, ``benchmarks/e2e.py``.

``stream``: the broker, topics, model and produced stream; ``daemons``: the daemon under
test (its config, process and scores); one module per suite: ``throughput``, ``paired``
(side by side and TLS), ``latency``, ``fleet`` (scale and restart). ``soak.py`` and
``commit_round.py`` use the helpers too.
"""
