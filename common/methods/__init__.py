"""The federated methods, one class each (base.py says what every method is asked; docs/methods.md)."""
