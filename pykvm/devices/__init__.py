"""Device models and the buses that route guest accesses to them."""
