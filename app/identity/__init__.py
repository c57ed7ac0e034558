"""Who may change the mesh: people and their teams, sign-in, sessions, API and join tokens,
and the roles the service layer enforces (``principal.authorize``)."""
