"""Command-line layer: one module per command (``dehaze``, ``evaluate`` (scripts/test.py),
``train``, ``reproduce``), shared option groups in ``options``, error reporting in
``errors``. Each module has ``run(argv)`` (raises, returns results; for Python callers
and tests) and ``main(argv)`` (one-line errors, exit code; for the console)."""
