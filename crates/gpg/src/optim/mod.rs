//! Optimiser (AdamW), global-norm gradient clipping, learning-rate schedules.
