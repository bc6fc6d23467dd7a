"""Engines the node agent can run or attach to."""
