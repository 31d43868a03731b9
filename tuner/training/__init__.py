"""Training one trial, independent of Optuna: datasets on the device, models, Adam and schedules, the epoch loop."""
