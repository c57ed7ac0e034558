"""The push side of the control plane: agents, their config snapshots and their sync state.

Split as go-control-plane splits its cache: ``snapshot`` compiles database state into one
consistent, content-hashed config per (namespace, service); ``cache`` keeps the latest snapshot
per group and answers the agents' held long polls; ``status`` remembers what each agent was sent,
ACKed and NACKed. ``hub`` ties them to the database and to the request cycle.
"""
