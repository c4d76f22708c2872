"""Benchmarks: scripts that print a table and write JSON with the device, commit, command and date
(`bench.record`) under bench/results/. Run them from the repository root: `python -m bench.NAME`."""
