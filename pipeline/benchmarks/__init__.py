"""Throughput benchmarks (not tests): `models` times each stage alone, `end_to_end` the whole pipeline."""
