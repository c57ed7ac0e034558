"""The operator's side of ``meshctl``: ``get``, ``export`` and ``apply``, all over the JSON API.

``export`` writes the catalog (services, versions: not instances, which agents register), every
service's traffic policy and the mesh-wide defaults as one YAML document::

    apiVersion: mesh/v1
    kind: List
    items:
    - kind: MeshDefaults          # only in a full export (no -n)
      spec: {...}                 # app.policies.schemas.MeshDefaultsSpec
    - kind: Service
      metadata: {namespace: shop, name: catalog}
      spec: {owner_team, description, links, labels, dependencies, versions: [{name, labels}]}
    - kind: TrafficPolicy         # only for services that have one
      metadata: {namespace: shop, name: catalog}
      spec: {...}                 # app.policies.schemas.TrafficPolicySpec

``apply`` is all or nothing as far as a client can make it: the whole file is validated locally
first, with the API's own schemas and the same policy checks the server runs
(``policy_issues``), against what the server holds; every problem is reported as
``FILE:LINE: KIND NAME: FIELD: message`` and nothing is written. Only then are the changes sent,
each with the revision that was read. If the server still refuses one (someone changed it in
the meantime: 409), apply stops there and says what was already applied. Apply creates and
updates, it never deletes.

One module per command family: ``client`` (HTTP client, ``ApiError``), ``tables`` (output),
``get``, ``document`` (the file format), ``export`` and ``apply``. Registered on ``app.cli.cli``
by importing this package (one line at the end of ``app/cli.py``).
"""

from __future__ import annotations

from app.cli import cli
from app.operator import apply, export, get
from app.operator.client import ApiError, Client, make_client
from app.operator.document import API_VERSION

__all__ = ["API_VERSION", "ApiError", "Client", "make_client"]

# The same order as before the split: the get group, then export, then apply.
cli.add_typer(get.get_cli, name="get")
cli.command("export")(export.export)
cli.command("apply")(apply.apply)
