"""Traffic policy per service and the mesh-wide defaults, stored as audited revisions."""
