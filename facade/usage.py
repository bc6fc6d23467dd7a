"""What each request used, gathered in memory and reported to the controller
in batches (controller/usage.py), with the limiter's live counters.

Recording a request is a dict update: no await, no lock, no I/O. A report
runs about once a second; a report that fails is kept and sent with the next
(for up to MAX_PENDING kinds of request, then the oldest figures are logged
and dropped rather than growing without end). Nothing about a request's
content is recorded: who, which model and endpoint, the status, the engine's
token counts and the duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from facade.limits import Counter, Limiter, Others
from kscope.v1 import inference_pb2, usage_pb2, usage_pb2_grpc

log = logging.getLogger(__name__)

REPORT_EVERY_S = 1.0
REPORT_TIMEOUT_S = 5.0
MAX_PENDING = 100_000
"""Kinds of request (key, model, endpoint, status, hour) kept while the
controller cannot be reached."""

_Kind = tuple[str, str, str, str, int, int]
"""(key id, owner, model, endpoint, status, hour)."""


@dataclass
class _Sum:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    duration_s: float = 0.0

    def add(self, other: _Sum) -> None:
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.duration_s += other.duration_s


class UsageRecorder:
    def __init__(self, limiter: Limiter):
        self.limiter = limiter
        self.facade = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        """Tells this process's live counters from another facade's with the same name."""
        self._pending: dict[_Kind, _Sum] = {}
        self.by_owner: dict[tuple[str, str], list[int]] = {}
        """(owner, model) → [requests, prompt tokens, completion tokens], for /metrics."""
        self.reported = 0
        """Reports the controller took (for tests and /health)."""

    def record(
        self,
        key_id: str,
        owner: str,
        model: str,
        endpoint: str,
        status: int,
        duration_s: float,
        usage: inference_pb2.Usage | None,
    ) -> None:
        prompt = usage.prompt_tokens if usage is not None else 0
        completion = usage.completion_tokens if usage is not None else 0
        now = time.time()
        kind = (key_id, owner, model, endpoint, status, int(now) - int(now) % 3600)
        pending = self._pending.get(kind)
        if pending is None:
            pending = self._pending[kind] = _Sum()
        pending.requests += 1
        pending.prompt_tokens += prompt
        pending.completion_tokens += completion
        pending.duration_s += duration_s
        totals = self.by_owner.get((owner, model))
        if totals is None:
            totals = self.by_owner[(owner, model)] = [0, 0, 0]
        totals[0] += 1
        totals[1] += prompt
        totals[2] += completion

    def _request(
        self,
    ) -> tuple[usage_pb2.ReportUsageRequest, dict[_Kind, _Sum], list[tuple[Counter, int]]]:
        sent, self._pending = self._pending, {}
        loads = self.limiter.loads()
        request = usage_pb2.ReportUsageRequest(
            facade=self.facade,
            deltas=[
                usage_pb2.UsageDelta(
                    key_id=k[0], owner=k[1], model=k[2], endpoint=k[3], status=k[4], hour=k[5],
                    requests=s.requests, prompt_tokens=s.prompt_tokens,
                    completion_tokens=s.completion_tokens, duration_seconds=s.duration_s,
                )
                for k, s in sent.items()
            ],
            loads=[
                usage_pb2.SubjectLoad(
                    subject=c.subject, requests_last_minute=len(c.starts),
                    tokens_last_minute=c.tokens_in_window, in_flight=c.in_flight,
                )
                for c, _ in loads
            ],
        )  # fmt: skip
        return request, sent, loads

    def _keep(self, sent: dict[_Kind, _Sum]) -> None:
        """A report failed: its figures go with the next one."""
        for kind, figures in sent.items():
            pending = self._pending.get(kind)
            if pending is None:
                if len(self._pending) >= MAX_PENDING:
                    log.error("usage lost (controller unreachable too long): %s %s", kind, figures)
                    continue
                pending = self._pending[kind] = _Sum()
            pending.add(figures)

    async def report(self, stub: usage_pb2_grpc.UsageServiceAsyncStub) -> bool:
        """Send what is pending; True when the controller took it."""
        request, sent, loads = self._request()
        if not request.deltas and not request.loads:
            return True
        try:
            reply = await stub.ReportUsage(request, timeout=REPORT_TIMEOUT_S)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            self._keep(sent)
            raise
        self.reported += 1
        self.limiter.reported(
            loads,
            {
                o.subject: Others(
                    o.requests_last_minute, o.tokens_last_minute, o.in_flight, o.tokens_today
                )
                for o in reply.others
            },
        )
        return True

    async def run(self, stub: Callable[[], usage_pb2_grpc.UsageServiceAsyncStub]) -> None:
        """Report every REPORT_EVERY_S until cancelled; on cancel, one last try."""
        failing = False
        try:
            while True:
                await asyncio.sleep(REPORT_EVERY_S)
                try:
                    await self.report(stub())
                    if failing:
                        log.info("usage reports reach the controller again")
                    failing = False
                except grpc.aio.AioRpcError as exc:
                    if not failing:
                        log.warning("usage report failed (kept for the next): %s", exc.code().name)
                    failing = True
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.report(stub()))
