"""Subcommands that talk to a running mount or set one up; each is imported only when used."""
