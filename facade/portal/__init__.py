"""The web portal: log in (LDAP or local users), manage API keys, see models, connect."""
