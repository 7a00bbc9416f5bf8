"""Benchmark harness: every dsv4fn op on every backend against the roofline and the peers (bench/README.md)."""
