"""The DAG runner behind `alignflow run`: stages, caching by input hash, resume."""

from alignflow.pipeline.runner import PipelineError, StageContext, load_pipeline, run_pipeline

__all__ = ["PipelineError", "StageContext", "load_pipeline", "run_pipeline"]
