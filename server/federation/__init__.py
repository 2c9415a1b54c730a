"""One run at the coordinator, in parts a strategy receives (federation.py): the link to the
sites (site_link.py, discovery.py, site_grid.py), the per-round record (round_record.py), the
validation schedule (validation.py), the model factory (model_factory.py), the Flower strategy
loop and its tap (flower_loop.py, tap.py)."""
