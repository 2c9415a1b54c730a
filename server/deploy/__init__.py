"""A real deployment on Flower's Deployment Engine (launch/server.py, launch/site.py), one job per
module:

- supervision.py: the processes a launcher starts (own session, death signal, a tag in their
  environment to find Flower's detached helpers), the folder lock, ports and addresses;
- tls.py: the coordinator's certificate files, the INSECURE banner, waiting for a listener;
- superlink.py: the coordinator's `flower-superlink`, behind superlink_guard.py (only the Fleet
  API answers other hosts);
- flwr_cli.py: the `flwr` CLI (register keys, submit and follow a run);
- site_nodes.py: each site's name bound to its registered key's node id;
- bundle.py: the app bundle `flwr run` ships (code only) and its SHA-256 for pinning;
- run_files.py: inside the ServerApp: the prepared run folder, progress.log, the wire audit.
"""
