"""tuner: hyperparameter tuning of Adam on CIFAR-10 with Optuna and PyTorch."""

__version__ = "0.1.0"
