"""Ray Tune sweeps: `python -m raydiff.tune` runs one TorchTrainer per trial and ranks trials by `val_loss`."""
