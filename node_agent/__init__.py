"""KScope node agent: runs one engine, serves InferenceService, reports to the controller."""
