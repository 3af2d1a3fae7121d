"""Driving request streams: several prompts' streams merged as their events come, and a client's disconnect."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import Request

from nanoseek.engine.engine import TokenEvent
from nanoseek.server.async_engine import RequestStream


async def disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, list[TokenEvent]]]:
    """Events of several request streams as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async for events in streams[0]:
            yield 0, events
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, stream: RequestStream):
        try:
            async for events in stream:
                q.put_nowait((k, events))
        except BaseException as e:
            q.put_nowait((k, e))
            return
        q.put_nowait((k, None))

    tasks = [asyncio.ensure_future(pump(k, s)) for k, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            k, item = await q.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield k, item
    finally:
        for t in tasks:
            t.cancel()
