"""Research tooling kept apart from what ships: the built-in tiny model's pretraining and its data."""
