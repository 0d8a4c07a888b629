"""Metadata store: content-addressed artifacts, lineage, runs and metrics."""

from alignflow.store.api import AlertRecord, ArtifactInfo, LineageGraph, Store

__all__ = ["AlertRecord", "ArtifactInfo", "LineageGraph", "Store"]
