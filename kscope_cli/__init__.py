"""The `kscope` command."""
