"""Benchmarks run by ``harness bench`` (each module exposes ``main(argv) -> int``)."""
