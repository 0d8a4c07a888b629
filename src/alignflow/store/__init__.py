"""Metadata store: content-addressed artifacts, lineage, runs and metrics."""

from alignflow.store.api import ArtifactInfo, LineageGraph, Store

__all__ = ["ArtifactInfo", "LineageGraph", "Store"]
