"""mesh-agent: the sidecar proxy of the mesh (data plane).

One agent runs beside each service instance: an inbound listener in front of the app, an outbound
listener the app calls other services through, and an admin listener (/ready, /metrics, /config).
Run it with ``mesh-agent --help``. The wire contract shared with the control plane is
:mod:`mesh_agent.protocol`.

Importing this package stays cheap on purpose: the event loop, parsers and telemetry SDK are
imported by the modules that use them, not here.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"

import os as _os

if _os.environ.get("MESH_AGENT_INTERPRETED") or _os.path.exists(
    _os.path.join(_os.path.dirname(__file__), "_native.built")
):
    # Asked to run interpreted, or an in-place compiled build (``make native``) that must
    # never run against edited sources.
    from mesh_agent.native import guard as _guard

    _guard()
