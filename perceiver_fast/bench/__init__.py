"""Benchmark engine behind `perceiver-fast bench`, `make report` and the suites in benchmarks/:
cases from the published shapes, providers (ours and the implementations people use), measured
runs with time and peak memory, the Markdown/PNG/JSON report and the comparison of two runs."""
