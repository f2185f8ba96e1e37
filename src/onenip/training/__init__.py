"""Training: the training set and its device-side batches, the losses, the distributed setup and the `Trainer`."""
