"""Klein routes, one module per API surface."""
