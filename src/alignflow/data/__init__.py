"""Data formats, readers and writers, curation, packing and token-budget batching."""
