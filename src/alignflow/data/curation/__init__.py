"""Data curation: every operation reads a dataset version and writes a new one with a lineage edge to it.

`stats` (statistics and diffs), `dedup` (exact, MinHash near and MiniLM semantic duplicates), `filters`
(rules that drop rows), `tags` (a safe `--where` expression language), `drift` (embedding two-sample tests),
`mix` (exact-weight mixtures with language balancing) and `hf` (Hugging Face `save_to_disk` folders).
"""
