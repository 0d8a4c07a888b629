"""Training recipes: sft, reward, dpo, ppo. Each reads top to bottom; a YAML config sits beside it."""
