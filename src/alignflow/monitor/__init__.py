"""Monitoring a run while it trains: trackers (TensorBoard, MLflow) and alert rules.

Nothing heavy is imported here: `tensorboard`, `mlflow` and `httpx` are imported inside the
functions that use them, so `import alignflow` stays light when no tracker is configured.
"""
