"""Training engine: distributed setup, DeepSpeed sharding, optimiser, schedules, metrics, checkpoints."""
