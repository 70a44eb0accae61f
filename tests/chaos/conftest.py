"""Fixtures for the chaos suite: ``rig`` (and ``kafka_rig``), a fresh
:class:`~tests.chaos._rig.Rig` per test, with its own data directory outside pytest's temp root
(see ``private_data_root``); every process it started is gone when the test ends, passed or
failed."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from tests.chaos._rig import Rig
from tests.fixtures.postgres import private_data_root
from tests.fixtures.receiver import Receiver


@pytest_asyncio.fixture
async def rig() -> AsyncIterator[Rig]:
    async with Receiver() as receiver:
        made = Rig(private_data_root(), receiver)
        try:
            yield made
        finally:
            await made.close()


@pytest_asyncio.fixture
async def kafka_rig(kafka_bootstrap: str) -> AsyncIterator[Rig]:
    """A rig of two workers sharing the bus as one consumer group on the session's Kafka
    broker (Tansu), with its embedded PostgreSQL."""
    async with Receiver() as receiver:
        made = Rig(private_data_root(), receiver, kafka=kafka_bootstrap, workers=2)
        try:
            yield made
        finally:
            await made.close()
