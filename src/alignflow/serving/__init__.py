"""The serving gateway: OpenAI-compatible HTTP over policy versions, experiments, logs and production feedback."""
