"""Fine-tuning: head swap, resolution change, evaluation."""
