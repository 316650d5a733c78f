"""Training: SFT stages 1-3 (``monet.train.sft``), losses, teacher stores, checkpoints."""
