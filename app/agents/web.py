"""HTML routes (console pages) of this domain."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from app.web import require_same_origin

router = APIRouter(dependencies=[Depends(require_same_origin)])
