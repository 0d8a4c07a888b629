"""Synthetic task domains with gold scorers, for the quickstart, tests and benchmarks."""
