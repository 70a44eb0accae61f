"""With ``--workers N`` any worker reads every worker's metric files: a file another worker has
just created, before it is sized, leaves the figures as they were instead of failing the
reading (``/metrics``, ``/stats/*`` and the console answered 500 in that moment)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from eventbus import metrics

COUNT_IN_A_WORKER = """
from eventbus import metrics
metrics.DELIVERIES.labels(target="fn", outcome="delivered").inc(3)
"""


def test_a_worker_file_not_yet_sized_is_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a real second process writes its counter file, as a worker does
    subprocess.run(
        [sys.executable, "-c", COUNT_IN_A_WORKER],
        env={**os.environ, metrics.MULTIPROC_ENV: str(tmp_path)},
        check=True,
    )
    # and a third has opened its histogram file and not yet extended it
    (tmp_path / "histogram_999999.db").touch()
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(tmp_path))

    delivered = [
        sample.value
        for sample in metrics.families()["eventbus_deliveries"].samples
        if sample.name.endswith("_total") and sample.labels["target"] == "fn"
    ]
    assert delivered == [3.0]
    assert b'eventbus_deliveries_total{outcome="delivered",target="fn"} 3.0' in metrics.render()


def test_the_parents_counts_are_served_by_the_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The parent of serve --workers N restarts embedded servers and workers but serves no
    # /metrics: its counts were missing from every worker's.
    figures = metrics.ParentFigures(tmp_path)
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(tmp_path))
    assert b"eventbus_embedded_restarts_total{" not in metrics.render()  # nothing written yet
    metrics.EMBEDDED_RESTARTS.labels("test-server").inc()
    metrics.WORKER_RESTARTS.labels("7").inc(2)
    figures.publish()
    text = metrics.render()
    assert b'eventbus_embedded_restarts_total{server="test-server"} 1.0' in text
    assert b'eventbus_worker_restarts_total{worker="7"} 2.0' in text
    # a later change replaces the file whole
    metrics.WORKER_RESTARTS.labels("7").inc()
    figures.publish()
    assert b'eventbus_worker_restarts_total{worker="7"} 3.0' in metrics.render()
    assert [p.name for p in tmp_path.iterdir()] == ["parent.json"]


def test_a_worker_that_counted_nothing_leaves_no_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker failing at its start again and again left a file of zeros at each start:
    # thousands a day, every reading of the figures reading them all.
    def worker(code: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", f"{code}\nimport os; print(os.getpid())"],
            env={**os.environ, metrics.MULTIPROC_ENV: str(tmp_path)},
            check=True,
            capture_output=True,
            text=True,
        )
        return int(done.stdout)

    idle = worker("from eventbus import metrics")
    busy = worker(COUNT_IN_A_WORKER)
    assert list(tmp_path.glob(f"*_{idle}.db")), "no file to forget: the test proves nothing"
    # a file its worker was killed in opening (empty), and one broken: left, and nothing
    # raised (struct.error escaped: the parent of serve --workers N ended, every worker with it)
    (tmp_path / f"histogram_{busy}.db").touch()
    (tmp_path / f"gauge_all_{busy}.db").write_bytes(b"\xff" * 64)
    metrics.forget_process(idle, tmp_path)
    metrics.forget_process(busy, tmp_path)
    assert not list(tmp_path.glob(f"*_{idle}.db"))
    assert list(tmp_path.glob(f"counter_{busy}.db"))  # its counts stay counted
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(tmp_path))
    assert b'eventbus_deliveries_total{outcome="delivered",target="fn"} 3.0' in metrics.render()
