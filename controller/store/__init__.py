"""Durable state of the controller."""
