"""The PV catalogue at scale: registering many PVs, again, and a changed subset."""

from __future__ import annotations

from dataclasses import replace

from labctl.ioc.pv import PVInfo
from labctl.ioc.types import PVType
from labctl.server.historian.backend import open_backend
from labctl.server.historian.catalogue import register_catalogue
from labctl.server.historian.schema import ensure_schema, pv, pv_meta
from sqlalchemy import select

COUNT = 12_000  # more ids than one chunked update takes


def infos(count: int) -> list[PVInfo]:
    return [PVInfo(f"CAT:{i:05d}", PVType.FLOAT64, "soft", unit="K") for i in range(count)]


def test_many_pvs_register_once_and_again_and_a_changed_subset_is_versioned(tmp_path):
    backend = open_backend(f"sqlite:///{tmp_path}/history.sqlite")
    try:
        with backend.engine.begin() as conn:
            ensure_schema(conn, backend.kind, 1)
            first = register_catalogue(conn, backend.kind, infos(COUNT), 10)
        assert len(first) == COUNT and len(set(first.values())) == COUNT
        with backend.engine.begin() as conn:
            again = register_catalogue(conn, backend.kind, infos(COUNT), 20)
            assert again == first
            assert len(conn.execute(select(pv_meta.c.pv_id)).all()) == COUNT  # nothing changed: no new version
            assert set(conn.execute(select(pv.c.seen_us)).scalars()) == {20}
        subset = infos(COUNT)[: COUNT // 2]
        subset[7] = replace(subset[7], unit="mK")
        with backend.engine.begin() as conn:
            ids = register_catalogue(conn, backend.kind, subset, 30)
            assert ids == {i.name: first[i.name] for i in subset}
            seen = dict(conn.execute(select(pv.c.name, pv.c.seen_us)).all())
            assert seen["CAT:00000"] == 30 and seen[f"CAT:{COUNT - 1:05d}"] == 20
            versions = conn.execute(select(pv_meta.c.time_us).where(pv_meta.c.pv_id == first["CAT:00007"])).scalars().all()
            assert sorted(versions) == [10, 30]
            unit = conn.execute(select(pv.c.unit).where(pv.c.name == "CAT:00007")).scalar_one()
            assert unit == "mK"
    finally:
        backend.dispose()
