"""Service catalog: services, their versions (subsets) and instances."""
