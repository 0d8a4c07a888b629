"""The serving gateway: OpenAI-compatible HTTP over policy versions, experiments, logs and production feedback.

Import the submodules directly (:mod:`alignflow.serving.engine` holds the builtin batched engine and the
upstream one); this package imports nothing, so ``import alignflow.serving`` stays cheap.
"""
