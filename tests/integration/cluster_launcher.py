"""Start a two-node local Ray cluster, print its address as JSON, and stop it when stdin closes.

Run as a subprocess by test_cluster.py, so the cluster lives apart from the test session's own Ray.
"""

import json
import sys

from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
print(json.dumps({"address": cluster.address}), flush=True)
sys.stdin.read()
cluster.shutdown()
