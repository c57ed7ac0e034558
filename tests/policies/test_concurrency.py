"""Two operators who both read revision N: the second writer must lose with a 409, even when
its revision check passed (it read before the first writer committed)."""

from __future__ import annotations

import pytest

from app.catalog import service as catalog
from app.catalog.schemas import ServiceCreate, VersionCreate
from app.db import Database
from app.errors import StaleRevisionError
from app.policies import service as policies
from app.policies.schemas import TrafficPolicySpec, TrafficPolicyWrite, WeightsWrite
from tests.conftest import person


def test_concurrent_writers_of_the_same_revision_cannot_both_win(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    with database.session(write=True) as session:
        catalog.create_service(
            session, person("t"), data=ServiceCreate(name="reviews", owner_team="a")
        )
        for v in ("v1", "v2"):
            catalog.create_version(
                session,
                person("t"),
                namespace="default",
                name="reviews",
                data=VersionCreate(name=v),
            )
        session.commit()
    with database.session(write=True) as first:
        policies.set_weights(
            first,
            person("alice"),
            namespace="default",
            name="reviews",
            data=WeightsWrite(weights={"v1": 90, "v2": 10}, revision=0),
        )
        first.commit()
    # The second writer read revision 0 before the first committed: replay that read.
    monkeypatch.setattr(policies, "current_policy", lambda session, service: None)
    with database.session(write=True) as second, pytest.raises(StaleRevisionError):
        policies.put_policy(
            second,
            person("bob"),
            namespace="default",
            name="reviews",
            data=TrafficPolicyWrite(revision=0, spec=TrafficPolicySpec()),
        )
    monkeypatch.undo()
    with database.session(write=False) as session:
        _, row, spec_now = policies.get_policy(session, "default", "reviews")
        assert row is not None
        assert (row.revision, row.actor) == (1, "alice")
        assert policies.default_weights(spec_now) == {"v1": 90, "v2": 10}
