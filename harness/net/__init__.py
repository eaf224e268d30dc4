"""Host-side networking: the shared test stream, test peers and network namespaces."""
