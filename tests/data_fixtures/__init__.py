"""Helpers shared by tests/test_data_*.py: hand-written Monet-SFT samples and the tiny processor."""
