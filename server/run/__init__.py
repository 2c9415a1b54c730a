"""A run's folder and life: creating it, resuming it, and the files it starts from."""
