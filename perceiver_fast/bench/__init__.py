"""Benchmark engine behind `perceiver-fast bench`, `make report` and the suites in benchmarks/:
cases from the published shapes in named sets (sets.py), providers at op, layer and model level
(ours and the implementations people use), measured runs with time and peak memory, the
Markdown/PNG/JSON report of each set and the comparison of two runs."""
