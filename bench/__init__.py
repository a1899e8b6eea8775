"""Benchmarks (bench/README.md): a package so that one benchmark can use another's lab helpers."""
