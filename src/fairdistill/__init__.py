"""fairdistill: knowledge distillation for vision that reports accuracy and group fairness."""
__version__ = "0.1.0"
