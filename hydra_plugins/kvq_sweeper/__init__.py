"""Hydra sweeper plugin ``hydra/sweeper=kvq``: filters invalid and duplicate jobs before launch."""
