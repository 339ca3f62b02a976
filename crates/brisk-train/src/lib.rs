//! The `Trainer`: optimisers, schedules, losses, metrics, checkpoints (filled by the training issue).
