"""blockskip.device_train: the on-device app (precompute, train, resume). Uses blockskip.runtime only."""
