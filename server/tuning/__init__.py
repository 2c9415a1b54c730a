"""Tuning each strategy on validation (launch/tune.py): the search space and the study."""
