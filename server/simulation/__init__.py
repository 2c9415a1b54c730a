"""The simulation engine: one run on Flower's Simulation Engine in a Ray session, and its resources."""
