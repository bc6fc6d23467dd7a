"""KScope controller: the control plane (catalog, instances, agents, routes)."""
