"""Benchmarks of rebel_kernels against plain PyTorch (pytest-benchmark). See bench/test_bench_loss.py."""
