"""Benchmarks and experiments (pytest-benchmark suites; results as JSON under bench/results/).

Suites: test_bench_loss.py (fused op vs peers), test_bench_generate.py (sampler vs HF generate),
test_bench_iteration.py with _iteration.py (one RL iteration vs TRL); the loss suite's shapes in
_cases.py, its providers in _providers.py, its FLOP/timing accounting in _accounting.py, its memory
probes in _memory.py. _environment.py is the one environment record every results file carries
(conftest.py saves the suites; compare.py, every algorithm on the built-in task; cuda_check.py).
report.py prints tables and plots of any results file.
"""
