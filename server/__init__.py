"""What runs at the coordinator: the Flower ServerApp, strategies, cross-site evaluation, tracking, reports."""
