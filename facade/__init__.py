"""KScope facade: OpenAI-compatible HTTP in front, streaming gRPC to agents behind."""
