"""Performance harness: ``python -m benchmarks all [--quick] [--only AREA ...] [--out DIR]``.

See ``benchmarks/README.md`` for the method and ``benchmarks/harness.py`` for the code of it.
"""
