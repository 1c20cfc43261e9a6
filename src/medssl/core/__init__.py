"""The compute core: tensors and config sections in, plain results out.

Imports torch, numpy and scikit-learn only (never MLflow, DVC, Optuna, Prefect or a path), and draws
every random number from a generator it is given, so a GPU host with only PyTorch can run and
benchmark it, and concurrent callers never change each other's draws.
"""
