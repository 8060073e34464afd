"""`serve`: Redis, router and workers on one machine, in one command."""
