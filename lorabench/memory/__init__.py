"""The torch-free memory estimator."""
