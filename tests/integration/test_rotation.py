"""Certificates that live a few seconds are renewed under a long stream, which
completes; afterwards every process still makes new connections (a new
facade enrolls and is served through the same agent), which only renewed
certificates allow."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.procs import (
    Controller,
    Upstream,
    start_controller,
    start_facade,
    start_upstream,
    stop_instances_left_behind,
    wait_until,
)

pytestmark = pytest.mark.security

LIFETIME_S = 6
TOKENS = 500  # 20 ms apart: 10 s, past the first certificates' end


@pytest.fixture(scope="module")
def short_lived(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Controller]]:
    tmp = tmp_path_factory.mktemp("rotation")
    paced: Upstream = start_upstream(tmp, "--token-interval-ms", "20", name="paced")
    controller = start_controller(
        tmp,
        f"""
[[models]]
name = "paced"
engine = "openai"
upstream_url = "{paced.url}"
min_replicas = 1
expected_startup_s = 3
""",
        env={"KSCOPE_TLS_CERT_LIFETIME_S": str(LIFETIME_S)},
    )
    try:
        yield tmp, controller
    finally:
        controller.proc.stop()
        paced.proc.stop()
        stop_instances_left_behind(controller.state_dir)


@pytest.mark.parametrize("transport", ["multiplex", "per-call"])
def test_a_long_stream_outlives_the_certificates_it_started_with(
    short_lived: tuple[Path, Controller], transport: str
) -> None:
    tmp, controller = short_lived
    facade = start_facade(tmp, controller, name=f"facade-{transport}",
                          multiplex=transport == "multiplex")  # fmt: skip
    try:
        client = openai.OpenAI(base_url=f"{facade.base_url}/v1", api_key="-", max_retries=0)

        def ready() -> bool:
            try:
                client.chat.completions.create(
                    model="paced", messages=[{"role": "user", "content": "hi"}], max_tokens=1
                )
            except openai.APIError:
                return False
            return True

        wait_until(ready, 30, 0.2, what="paced model served")
        started = time.monotonic()
        stream = client.chat.completions.create(
            model="paced", messages=[{"role": "user", "content": "hi"}], max_tokens=TOKENS,
            stream=True,
        )  # fmt: skip
        chunks = [c for c in stream if c.choices and c.choices[0].delta.content]
        assert len(chunks) == TOKENS
        assert time.monotonic() - started > LIFETIME_S  # the first certificates ended meanwhile
        assert "certificate renewed" in facade.proc.log()

        # Past every first certificate's end, new connections still work: a new
        # facade enrolls (the controller renewed its own) and dials the agent
        # (which renewed its server certificate).
        fresh = start_facade(tmp, controller, name=f"fresh-{transport}",
                             multiplex=transport == "multiplex")  # fmt: skip
        try:
            fresh_client = openai.OpenAI(base_url=f"{fresh.base_url}/v1", api_key="-")
            wait_until(lambda: _answers(fresh_client), 20, 0.2, what="a new facade served")
        finally:
            fresh.proc.stop()
        # And the first facade, with its renewed certificate, still serves too.
        assert _answers(client)
    finally:
        facade.proc.stop()


def _answers(client: openai.OpenAI) -> bool:
    try:
        reply = client.chat.completions.create(
            model="paced", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    except openai.APIError:
        return False
    return bool(reply.choices)
