"""Annotation quality: agreement coefficients, annotator scoring, aggregation (crowd-kit), QC policy, reports.

Modules: `schema` (the judgments contract), `agreement`, `annotators`, `aggregate`, `policy`, `efficiency`,
`simulate`, `datasets` (real-data readers), `report`. crowd-kit, sentence-transformers and matplotlib are
imported inside the functions that need them, so importing this package stays fast.
"""
