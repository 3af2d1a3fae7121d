"""The engine behind the server: one thread owns the synchronous Engine; asyncio code talks to it by message.

    aengine = AsyncEngine(engine); aengine.start()
    stream = await aengine.add_request("chatcmpl-1", prompt_ids, params)   # raises RequestRefused
    async for events in stream: ...                                         # list[TokenEvent] per step
    streams = await aengine.add_requests([(rid, ids, params), ...])         # several prompts, all or none
    aengine.stop()

The thread loops: take new requests and aborts from a thread-safe inbox, call `engine.step()`, and hand
each request's events to its asyncio queue with `loop.call_soon_threadsafe`, so the event loop never waits
on torch. A stream that is closed early (client gone) aborts its request: the thread drops it before the
next step, freeing its batch slot and cache blocks. A request the engine refuses fails alone; an exception
inside a step fails the requests that step touched (and is logged), and the loop keeps serving.
`outstanding` counts the sequences sent to the thread and not yet finished (the server's queue bound); the
thread gives them back as each request ends, however it ends (finished, refused, aborted, failed).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import Counter
from dataclasses import dataclass

import torch

from nanoseek.engine.engine import Engine, TokenEvent
from nanoseek.engine.sampling import SamplingParams

log = logging.getLogger("nanoseek.server")


class RequestRefused(ValueError):
    """The engine cannot serve this request (the message says why): the client's fault, a 400."""


class GenerationFailed(RuntimeError):
    """The engine failed while generating this request: the server's fault, a 500."""


@dataclass(frozen=True)
class EngineSnapshot:
    """What /metrics reports, published by the engine thread after each step (read without locks)."""

    waiting_requests: int = 0
    running_requests: int = 0
    running_sequences: int = 0
    cache_blocks_used: int = 0
    cache_blocks_total: int = 0
    steps: int = 0
    preemptions: int = 0
    prompt_tokens: int = 0  # prefilled or found in the prefix cache (recomputed after preemption included)
    cached_prompt_tokens: int = 0  # found in the prefix cache
    aborted: int = 0
    failed_steps: int = 0


@dataclass
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    admitted: asyncio.Future
    events: asyncio.Queue
    cached_tokens: int = 0  # prompt tokens found in the prefix cache, set before the request's last item


@dataclass
class _Abort:
    request_id: str


class _Stop:
    pass


_DONE = None  # queue item after a request's last events


class RequestStream:
    """The events of one admitted request, as lists of TokenEvent (one list per engine step)."""

    def __init__(self, aengine: AsyncEngine, request_id: str, events: asyncio.Queue, add: _Add | None = None):
        self.aengine, self.request_id, self.events = aengine, request_id, events
        self.done = False
        self._add = add

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens the engine found in its prefix cache (known once the stream has ended)."""
        return self._add.cached_tokens if self._add else 0

    def __aiter__(self):
        return self

    async def __anext__(self) -> list[TokenEvent]:
        if self.done:
            raise StopAsyncIteration
        item = await self.events.get()
        if item is _DONE:
            self.done = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self.done = True
            raise item
        return item

    def close(self) -> None:
        """Stop generating (the client went away); a no-op once the request has finished."""
        if not self.done:
            self.done = True
            self.aengine.abort(self.request_id)


class AsyncEngine:
    def __init__(self, engine: Engine, idle_poll_s: float = 0.5):
        self.engine = engine
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.idle_poll_s = idle_poll_s
        self.snapshot = EngineSnapshot(cache_blocks_total=engine.cache.n_blocks)
        self._active: dict[str, _Add] = {}  # owned by the engine thread
        self._thread: threading.Thread | None = None
        self._steps = self._aborted = self._failed_steps = 0
        self._torch_threads = torch.get_num_threads()  # OpenMP's thread count is per thread: carry it over
        self.outstanding = 0  # sequences sent to the thread and not yet ended (read and written on the loop)

    # ---- asyncio side -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self.inbox.put(_Stop())
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        """Queue a request and wait until the engine has taken it (or refused it: RequestRefused)."""
        return (await self.add_requests([(request_id, prompt_ids, params)]))[0]

    async def add_requests(self, requests: list[tuple[str, list[int], SamplingParams]]) -> list[RequestStream]:
        """Queue requests together (counted in `outstanding` at once) and wait until the engine has taken them
        all; if it refuses one, the others are aborted and RequestRefused is raised."""
        if not self.alive:
            raise GenerationFailed("the engine is not running")
        loop = asyncio.get_running_loop()
        adds = [_Add(rid, ids, params, loop, loop.create_future(), asyncio.Queue()) for rid, ids, params in requests]
        for a in adds:
            self.outstanding += a.params.n
            self.inbox.put(a)
        try:
            await asyncio.wait([a.admitted for a in adds])
        except asyncio.CancelledError:
            for a in adds:
                self.abort(a.request_id)
            raise
        refused = [a.admitted.exception() for a in adds if a.admitted.exception() is not None]
        if refused:
            for a in adds:
                self.abort(a.request_id)  # a no-op for the refused ones
            raise refused[0]
        return [RequestStream(self, a.request_id, a.events, a) for a in adds]

    def abort(self, request_id: str) -> None:
        self.inbox.put(_Abort(request_id))

    def _release(self, n: int) -> None:
        self.outstanding -= n

    # ---- engine thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_num_threads(self._torch_threads)
        while True:
            try:
                if not self._handle_inbox():
                    break
                if self.engine.has_unfinished():
                    self._step()
                self._publish()
            except Exception as e:  # a bug outside step(): fail what is in flight, keep the thread alive
                log.exception("engine loop error")
                for rid in list(self._active):
                    self._fail(rid, GenerationFailed(f"engine error: {e}"))
        for rid in list(self._active):
            self._fail(rid, GenerationFailed("the server is shutting down"))

    def _handle_inbox(self) -> bool:
        """Apply queued adds and aborts; waits for one when idle. False on stop."""
        block = not self.engine.has_unfinished()
        while True:
            try:
                msg = self.inbox.get(timeout=self.idle_poll_s) if block else self.inbox.get_nowait()
            except queue.Empty:
                return True
            block = False
            if isinstance(msg, _Stop):
                return False
            if isinstance(msg, _Abort):
                req = self._active.pop(msg.request_id, None)
                if req is not None:
                    self.engine.abort(msg.request_id)
                    self._aborted += 1
                    _call(req.loop, self._release, req.params.n)
                continue
            try:
                self.engine.add_request(msg.prompt_ids, msg.params, request_id=msg.request_id)
            except ValueError as e:
                _call(msg.loop, _settle, msg.admitted, RequestRefused(str(e)))
                _call(msg.loop, self._release, msg.params.n)
                continue
            self._active[msg.request_id] = msg
            _call(msg.loop, _settle, msg.admitted, None)

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as e:
            self._failed_steps += 1
            log.exception("engine step failed; failing the requests it touched")
            self._fail_touched(e)
            return
        self._steps += 1
        per_request: dict[str, list[TokenEvent]] = {}
        for ev in events:
            per_request.setdefault(ev.request_id, []).append(ev)
        for rid, evs in per_request.items():
            if rid in self._active:
                req = self._active[rid]
                _call(req.loop, req.events.put_nowait, evs)
        # A sample can also finish without an event (the scheduler found no room for it at all).
        for rid in [r for r in self._active if self.engine.is_finished(r)]:
            req = self._active.pop(rid)
            req.cached_tokens = self.engine.pop_output(rid).num_cached_tokens
            _call(req.loop, req.events.put_nowait, _DONE)
            _call(req.loop, self._release, req.params.n)

    def _fail_touched(self, error: Exception) -> None:
        """After a failed step: fail every request except those still wholly waiting (untouched by it)."""
        waiting = Counter(s.request_id for s in self.engine.waiting if not s.finish_reason)
        for rid, req in list(self._active.items()):
            if waiting[rid] < req.params.n:
                self._fail(rid, GenerationFailed(f"generation failed: {type(error).__name__}: {error}"))

    def _fail(self, rid: str, error: Exception) -> None:
        req = self._active.pop(rid)
        try:
            self.engine.abort(rid)
        except Exception:
            log.exception("abort of %s failed", rid)
        _call(req.loop, req.events.put_nowait, error)
        _call(req.loop, self._release, req.params.n)

    def _publish(self) -> None:
        e = self.engine
        self.snapshot = EngineSnapshot(
            waiting_requests=len(
                {s.request_id for s in e.waiting if not s.finish_reason} - {s.request_id for s in e.running}
            ),
            running_requests=len({s.request_id for s in e.running}),
            running_sequences=len(e.running),
            cache_blocks_used=e.cache.n_blocks - e.cache.n_free,
            cache_blocks_total=e.cache.n_blocks,
            steps=self._steps,
            preemptions=e.stats.preemptions,
            prompt_tokens=e.stats.prompt_tokens,
            cached_prompt_tokens=e.stats.cached_prompt_tokens,
            aborted=self._aborted,
            failed_steps=self._failed_steps,
        )


def _call(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    """Run fn(*args) on the event loop (from the engine thread); a loop that has closed is ignored."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


def _settle(fut: asyncio.Future, error: BaseException | None) -> None:
    if not fut.done():  # the waiting handler may have been cancelled
        fut.set_exception(error) if error else fut.set_result(None)
