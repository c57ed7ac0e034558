"""The topology domain: what the traffic looks like (the graph and golden metrics)."""
