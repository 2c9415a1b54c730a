"""Training regimes, one file each. Each runner takes the run's parts (a `Federation`:
server/federation/federation.py) and returns the models to compare.

`RUNNERS[name](fed) -> list[Trained]` (registry.py); the evaluator then scores every returned model at every
site. Flower's own strategy classes are used wherever one exists: fedavg.py, fedprox.py,
fedadam.py, fedyogi.py and fedbn.py each declare one, with the coordinator's tap (server/federation/tap.py), and
share one round loop (server/federation/flower_loop.py); site-level DP wraps them in Flower's DP
wrappers (server/privacy/site_dp.py), and FedAvg / FedProx run through Flower's SecAgg+ under
`privacy.secagg` (server/privacy/secagg.py). local.py,
pooled.py, sequential.py and loso.py (leave-one-site-out) have no Flower class and are written
here. Each file's docstring cites its paper and says what the coordinator records.
"""
