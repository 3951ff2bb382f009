# Convenience targets; the commands themselves are documented in README.md and benchmarks/README.md.
PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)

.PHONY: bench bench-quick bench-gpu

bench:          ## every benchmark area; regenerates benchmarks/results/latest.* and the README table
	$(PYTHON) -m benchmarks all --wait-idle 300

bench-quick:    ## smoke run (< 3 minutes), results in benchmarks/results/latest-quick.*
	$(PYTHON) -m benchmarks all --quick

bench-gpu:      ## the GPU section (CUDA only; skips otherwise)
	$(PYTHON) -m benchmarks gpu
