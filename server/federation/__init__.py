"""Talking to the sites during a run: the coordinator, the Flower grid and its site names,
discovery, one round's record, the Flower strategy loop and its tap."""
