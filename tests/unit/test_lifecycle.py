"""Every transition of the instance lifecycle, through the one pure function."""

from __future__ import annotations

from dataclasses import replace

import pytest

from controller.lifecycle import (
    AgentPhase,
    InstanceFacts,
    InstanceState,
    LauncherPhase,
    derive_state,
)

S = InstanceState
BASE = InstanceFacts(previous=S.REQUESTED)
RUNNING = replace(BASE, submitted=True, launcher_phase=LauncherPhase.RUNNING, previous=S.STARTING)
CONNECTED = replace(RUNNING, agent_connected=True)


@pytest.mark.parametrize(
    ("facts", "state", "reason_part"),
    [
        (BASE, S.REQUESTED, "waiting to be launched"),
        (replace(BASE, submitted=True), S.SUBMITTED, "submitted"),
        (
            replace(BASE, submitted=True, launcher_phase=LauncherPhase.PENDING,
                    launcher_reason="Priority"),
            S.PENDING, "Priority",
        ),
        (replace(BASE, submitted=True, launcher_phase=LauncherPhase.PENDING), S.PENDING, "queued"),
        (RUNNING, S.STARTING, "waiting for the agent"),
        (replace(CONNECTED, agent_phase=None), S.STARTING, "engine starting"),
        (replace(CONNECTED, agent_phase=AgentPhase.STARTING, agent_detail="loading weights"),
         S.STARTING, "loading weights"),
        (replace(CONNECTED, agent_phase=AgentPhase.READY), S.READY, "engine healthy"),
        (replace(CONNECTED, agent_phase=AgentPhase.DRAINING, previous=S.READY), S.DRAINING,
         "agent draining"),
        (replace(CONNECTED, agent_phase=AgentPhase.FAILED, agent_detail="exit 1"), S.FAILED,
         "exit 1"),
        (replace(CONNECTED, agent_phase=AgentPhase.READY, stop_requested=True, previous=S.READY),
         S.DRAINING, "draining"),
        (replace(RUNNING, launcher_phase=LauncherPhase.ENDED, stop_requested=True,
                 previous=S.DRAINING), S.STOPPED, "stopped on request"),
        (replace(RUNNING, launcher_phase=LauncherPhase.ENDED, launcher_reason="exit 9",
                 previous=S.READY), S.FAILED, "exit 9"),
        (replace(RUNNING, launcher_phase=LauncherPhase.ENDED, previous=S.READY), S.FAILED,
         "ended unexpectedly"),
        (replace(BASE, launch_error="sbatch: error"), S.FAILED, "sbatch: error"),
        (replace(BASE, stop_requested=True), S.STOPPED, "before it was launched"),
        (replace(RUNNING, agent_lost=True, previous=S.READY), S.FAILED, "agent lost"),
        (replace(RUNNING, agent_lost=True, agent_lost_reason="drained and left", previous=S.READY),
         S.FAILED, "drained and left"),
        (replace(RUNNING, agent_lost=True, stop_requested=True, previous=S.DRAINING), S.DRAINING,
         "draining"),
        (replace(RUNNING, awaiting_reconnect=True, previous=S.READY), S.READY, "reconnect"),
        (replace(RUNNING, reconnect_expired=True, previous=S.READY), S.FAILED, "did not reconnect"),
        (replace(RUNNING, age_s=1000, startup_timeout_s=900), S.FAILED, "not ready within 900s"),
        (replace(CONNECTED, agent_phase=AgentPhase.READY, age_s=1000, startup_timeout_s=900),
         S.READY, "engine healthy"),
    ],
)  # fmt: skip
def test_derive_state(facts: InstanceFacts, state: InstanceState, reason_part: str) -> None:
    derived, reason = derive_state(facts)
    assert derived is state
    assert reason_part in reason


@pytest.mark.parametrize("terminal", [S.STOPPED, S.FAILED])
def test_terminal_states_are_sticky(terminal: InstanceState) -> None:
    facts = replace(CONNECTED, agent_phase=AgentPhase.READY, previous=terminal)
    assert derive_state(facts)[0] is terminal


def test_every_state_is_reachable() -> None:
    """The table above reaches every state; this guards against a new state
    added without a transition test."""
    reached = {
        derive_state(f)[0]
        for f in [
            BASE,
            replace(BASE, submitted=True),
            replace(BASE, submitted=True, launcher_phase=LauncherPhase.PENDING),
            RUNNING,
            replace(CONNECTED, agent_phase=AgentPhase.READY),
            replace(CONNECTED, agent_phase=AgentPhase.READY, stop_requested=True),
            replace(RUNNING, launcher_phase=LauncherPhase.ENDED, stop_requested=True),
            replace(RUNNING, launcher_phase=LauncherPhase.ENDED),
        ]
    }
    assert reached == set(InstanceState)
