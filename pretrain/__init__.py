"""Pretraining: objectives, the one training loop, schedules, checkpoint / resume, logging."""
