"""Development and demonstration tooling: the local broker, the simulated plant, the demo.

Nothing here is imported by the daemon (an import-linter contract says so); a
production install runs without it and without its extras (``streamer[demo]``).
"""
