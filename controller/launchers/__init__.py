"""Launchers start and stop the processes (or jobs) behind instances."""
