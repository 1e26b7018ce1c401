"""Memory dry run: trace the device phases on fake tensors and predict their peak memory."""
