"""Helpers both the coordinator's and a site's deployment use: supervising child processes, the
insecure-mode banner."""
