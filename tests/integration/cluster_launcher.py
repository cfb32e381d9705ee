"""Start a two-node local Ray cluster, print its address as JSON, and stop it when stdin closes.

Run as a subprocess by the cluster tests, so the cluster lives apart from the test session's own Ray.
``cluster_launcher.py [CPUS]``: each node's logical CPUs (default 1).
"""

import json
import sys

from ray.cluster_utils import Cluster

cpus = float(sys.argv[1]) if len(sys.argv) > 1 else 1
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus, "include_dashboard": False})
cluster.add_node(num_cpus=cpus)
cluster.wait_for_nodes()
print(json.dumps({"address": cluster.address}), flush=True)
sys.stdin.read()
cluster.shutdown()
