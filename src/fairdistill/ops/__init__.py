"""Tensor operations shared by models, tasks and metrics (plain torch; no torchvision)."""
