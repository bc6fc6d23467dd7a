"""Nobody inside the cluster is trusted: mutual TLS, one identity per process and
a check on every RPC, with real processes and real TLS.

One system for the module: a controller (its CA made on first start), the fake
OpenAI upstream (bench/upstream.py), one `openai`-engine agent the controller
launched (it enrolled with its one-time token), one real facade, and client
credentials for every role a caller can have: nothing (anonymous), a host
agent's certificate (an agent, but not the live instance's), a facade's
certificate, a user key, the admin key and an operator's certificate.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kscope.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    control_pb2,
    control_pb2_grpc,
    identity_pb2,
    identity_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    keys_pb2,
    keys_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)
from kscope_common.pki import (
    CONTROLLER_DNS_NAME,
    Identity,
    Role,
    agent_instance,
    agent_server_name,
    make_csr,
    new_private_key,
)
from kscope_common.tls import (
    EnrollmentError,
    ProcessCertificate,
    enroll,
    public_channel,
    token_identity,
)
from tests.procs import (
    PYTHON,
    ROOT,
    Controller,
    Facade,
    Upstream,
    start_controller,
    start_facade,
    start_upstream,
    stop_instances_left_behind,
    wait_until,
)

pytestmark = pytest.mark.security

MODEL = "echo"
HOSTED = "hosted"
"""A model only host agents run: the test's fake host agent is handed its
instance's one-time token."""
CHAT = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                   "max_tokens": 2}).encode()  # fmt: skip
LONG_STREAM = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                          "max_tokens": 2000, "stream": True}).encode()  # fmt: skip
"""2000 tokens 20 ms apart: still streaming long after a test is done with it."""
OK, NF, BAD = grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT
UNAUTH, DENIED = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED
NO_TLS = grpc.StatusCode.UNAVAILABLE
"""A failed handshake: plaintext to a TLS port, or no client certificate for mutual TLS."""
GRPCURL = str(ROOT / ".venv" / "bin" / "grpcurl")
Metadata = tuple[tuple[str, str], ...]

ANON, HOST, FACADE, USER, ADMIN, OPER = ("anonymous", "host-agent", "facade", "user-key",
                                         "admin-key", "operator")  # fmt: skip
ROLES = (ANON, HOST, FACADE, USER, ADMIN, OPER)


def _bearer(key: str) -> Metadata:
    return (("authorization", f"Bearer {key}"),) if key else ()


# --- the system ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """One role's credentials: a certificate (mutual TLS, the mesh port) or
    none (server-authenticated TLS, the public port) with an optional API key."""

    name: str
    cert: ProcessCertificate | None = None
    key: str = ""


@dataclass
class System:
    tmp: Path
    controller: Controller
    facade: Facade
    mesh: str
    """The controller's mutual-TLS address, as Discover tells it."""
    instance: control_pb2.Instance
    agent: control_pb2.Agent
    callers: dict[str, Caller]
    enroll_token: str
    """A reusable facade token, for the table's Enroll calls."""

    @property
    def ca_pem(self) -> bytes:
        return self.controller.ca_pem

    @property
    def admin(self) -> Metadata:
        return self.controller.admin

    def public(self) -> grpc.aio.Channel:
        return public_channel(self.controller.address, self.ca_pem)

    def controller_channel(self, caller: Caller) -> grpc.aio.Channel:
        if caller.cert is not None:
            return caller.cert.controller_channel(self.mesh)
        return self.public()

    def agent_channel(self, caller: Caller) -> grpc.aio.Channel:
        """To the live agent's InferenceService, verifying its certificate."""
        agent = agent_instance(self.instance.id)
        if caller.cert is not None:
            return caller.cert.agent_channel(self.agent.address, agent)
        # Only the CA: the agent (mutual TLS only) refuses the handshake.
        override = ("grpc.ssl_target_name_override", agent_server_name(agent.uri))
        credentials = grpc.ssl_channel_credentials(self.ca_pem)
        return grpc.aio.secure_channel(self.agent.address, credentials, options=[override])

    async def enrolled(self, kind: str, name: str) -> ProcessCertificate:
        token = self.controller.enrollment_token(kind, name)
        return (await enroll(self.controller.address, self.ca_pem, token)).certificate

    async def as_admin(self, stub: Any, method: str, request: Message) -> Any:
        async with self.public() as channel:
            return await getattr(stub(channel), method)(request, metadata=self.admin, timeout=5)


def _catalog(upstream: Upstream) -> str:
    return f"""
[[models]]
name = "{MODEL}"
engine = "openai"
upstream_url = "{upstream.url}"
min_replicas = 1
max_replicas = 1
expected_startup_s = 3

[[models]]
name = "{HOSTED}"
engine = "openai"
launcher = "host"
upstream_url = "{upstream.url}"
min_replicas = 0
max_replicas = 1
expected_startup_s = 30
"""


def _ready(controller: Controller) -> control_pb2.Instance | None:
    ready = control_pb2.INSTANCE_STATE_READY
    return next((i for i in controller.list_instances(MODEL) if i.state == ready), None)


@pytest.fixture(scope="module")
async def system(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    tmp = tmp_path_factory.mktemp("security")
    upstream = start_upstream(tmp, "--token-interval-ms", "20")
    controller = start_controller(tmp, _catalog(upstream))
    facade: Facade | None = None
    try:
        facade = start_facade(tmp, controller, name="facade")
        wait_until(lambda: _ready(controller) is not None, 30, what="an echo instance READY")
        instance = _ready(controller)
        assert instance is not None
        (agent,) = [a for a in controller.list_agents() if a.instance_id == instance.id]
        async with public_channel(controller.address, controller.ca_pem) as channel:
            stub = identity_pb2_grpc.IdentityServiceStub(channel)
            mesh = (await stub.Discover(identity_pb2.DiscoverRequest(), timeout=5)).mesh_address
        callers = {ANON: Caller(ANON), ADMIN: Caller(ADMIN, key=controller.admin_key)}
        system = System(tmp, controller, facade, mesh, instance, agent, callers,
                        controller.enrollment_token("facade", "table-enroll"))  # fmt: skip
        # A user key limited to one model for one day.
        user = await system.as_admin(K, "CreateKey", keys_pb2.CreateKeyRequest(
            owner="uma", name="table", models=[MODEL], expires_in_seconds=86400))  # fmt: skip
        callers[USER] = Caller(USER, key=user.secret)
        for role, kind, name in ((HOST, "host", "sec-host"), (FACADE, "facade", "sec-facade"),
                                 (OPER, "operator", "sec-ops")):  # fmt: skip
            callers[role] = Caller(role, await system.enrolled(kind, name))
        yield system
    finally:
        if facade is not None:
            facade.proc.stop()
        controller.proc.stop()
        stop_instances_left_behind(controller.state_dir)
        upstream.proc.stop()


# --- calling any RPC and reading how it ended ---------------------------------------------


@dataclass(frozen=True)
class Rpc:
    """One RPC, a harmless request for it, and how a call the table admits ends."""

    stub: Callable[[grpc.aio.Channel], Any]
    method: str
    request: Message | Callable[[System, Caller], Message]
    shape: str = "unary"
    """unary, server (server streaming) or bidi."""
    admitted: grpc.StatusCode = OK

    def request_for(self, system: System, caller: Caller) -> Message:
        return self.request if isinstance(self.request, Message) else self.request(system, caller)


async def attempt(
    channel: grpc.aio.Channel, rpc: Rpc, request: Message, metadata: Metadata = (),
    timeout_s: float = 5.0,
) -> grpc.StatusCode:  # fmt: skip
    """Call once; a stream is read for one message, then cancelled."""
    for _ in range(3):
        code = await _attempt_once(channel, rpc, request, metadata, timeout_s)
        # A write that loses the race with the server's refusal reports gRPC
        # core's INTERNAL instead of the refusal (_attempt_once waits for a
        # refusal before writing; under load it can come later): ask again.
        if not (rpc.shape == "bidi" and code == grpc.StatusCode.INTERNAL):
            return code
    return code


REFUSAL_WAIT_S = 1.0
"""How long a bidi attempt waits for a refusal before it writes: refusals come
before the server reads anything, and a write racing one turns it into INTERNAL."""


async def _attempt_once(
    channel: grpc.aio.Channel, rpc: Rpc, request: Message, metadata: Metadata, timeout_s: float
) -> grpc.StatusCode:
    method = getattr(rpc.stub(channel), rpc.method)
    try:
        if rpc.shape == "unary":
            await method(request, metadata=metadata, timeout=timeout_s)
            return OK
        call = method(**({} if rpc.shape == "bidi" else {"request": request}),
                      metadata=metadata, timeout=timeout_s)  # fmt: skip
        try:
            if rpc.shape == "bidi":
                refused = asyncio.ensure_future(call.code())
                done, _ = await asyncio.wait({refused}, timeout=REFUSAL_WAIT_S)
                if done:
                    code: grpc.StatusCode = refused.result()
                    return code
                refused.cancel()
                await call.write(request)
            await call.read()
        finally:
            call.cancel()
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return OK


def _renew(system: System, caller: Caller) -> Message:
    """A CSR for the caller's own identity: what Renew signs."""
    identity = caller.cert.identity if caller.cert else Identity(Role.FACADE, "nobody")
    return identity_pb2.RenewRequest(csr_pem=make_csr(new_private_key(), identity).decode())


def _enroll(system: System, caller: Caller) -> Message:
    csr = make_csr(new_private_key(), token_identity(system.enroll_token)).decode()
    return identity_pb2.EnrollRequest(token=system.enroll_token, csr_pem=csr)


def _authenticate(system: System, caller: Caller) -> Message:
    return keys_pb2.AuthenticateKeyRequest(secret=system.callers[USER].key)


def _open(stream_id: int, body: bytes = CHAT) -> inference_pb2.MultiplexRequest:
    envelope = inference_pb2.RequestEnvelope(request_id=f"sec-{stream_id}", model=MODEL,
                                             stream=b'"stream": true' in body)  # fmt: skip
    kind = inference_pb2.INFERENCE_KIND_CHAT_COMPLETION
    opened = inference_pb2.MultiplexOpen(stream_id=stream_id, kind=kind, envelope=envelope,
                                         body=body)  # fmt: skip
    return inference_pb2.MultiplexRequest(opens=[opened])


def _generic(system: System, caller: Caller) -> Message:
    envelope = inference_pb2.RequestEnvelope(request_id="sec-generic", model=MODEL)
    return inference_pb2.InferenceRequest(
        kind=inference_pb2.INFERENCE_KIND_TOKENIZE, envelope=envelope,
        body=json.dumps({"model": MODEL, "prompt": "hi"}).encode(),
    )  # fmt: skip


def _inference(cls: Any, body: dict[str, Any]) -> Message:
    envelope = inference_pb2.RequestEnvelope(request_id="sec-table", model=MODEL)
    message: Message = cls(envelope=envelope, body=json.dumps({"model": MODEL, **body}).encode())
    return message


# fmt: off
C, AG = control_pb2_grpc.ControlServiceStub, agent_pb2_grpc.AgentServiceStub
K, ID = keys_pb2_grpc.KeyServiceStub, identity_pb2_grpc.IdentityServiceStub
INF = inference_pb2_grpc.InferenceServiceStub
U = usage_pb2_grpc.UsageServiceStub
HI = [{"role": "user", "content": "hi"}]

CONTROLLER_RPCS: dict[str, Rpc] = {
    "ControlService/ListModels": Rpc(C, "ListModels", control_pb2.ListModelsRequest()),
    "ControlService/ListInstances": Rpc(C, "ListInstances", control_pb2.ListInstancesRequest()),
    "ControlService/ListAgents": Rpc(C, "ListAgents", control_pb2.ListAgentsRequest()),
    "ControlService/EnsureModel": Rpc(
        C, "EnsureModel", control_pb2.EnsureModelRequest(model="no-such-model"), admitted=NF
    ),
    "ControlService/StopInstance": Rpc(
        C, "StopInstance", control_pb2.StopInstanceRequest(instance_id="no-such"), admitted=NF
    ),
    "ControlService/ScaleModel": Rpc(
        C, "ScaleModel", control_pb2.ScaleModelRequest(model="no-such-model"), admitted=NF
    ),
    "ControlService/WatchRoutes": Rpc(C, "WatchRoutes", control_pb2.WatchRoutesRequest(),
                                      "server"),
    "ControlService/GetTelemetry": Rpc(C, "GetTelemetry", control_pb2.GetTelemetryRequest()),
    "ControlService/ListDecisions": Rpc(C, "ListDecisions", control_pb2.ListDecisionsRequest()),
    # The host may register as its host agent (no models, a dead address: it
    # offers nothing and is soon lost); a Session for an unknown agent.
    "AgentService/Register": Rpc(AG, "Register", agent_pb2.RegisterRequest(
        host_agent=True, address="127.0.0.1:9", hostname="security-table")),
    "AgentService/Session": Rpc(AG, "Session", agent_pb2.SessionRequest(
        hello=agent_pb2.SessionHello(agent_id="nope")), "bidi", admitted=NF),
    "KeyService/CreateKey": Rpc(K, "CreateKey", keys_pb2.CreateKeyRequest(
        name="never-made", expires_in_seconds=-1), admitted=BAD),
    "KeyService/ListKeys": Rpc(K, "ListKeys", keys_pb2.ListKeysRequest()),
    "KeyService/RevokeKey": Rpc(K, "RevokeKey", keys_pb2.RevokeKeyRequest(key_id="key_nope"),
                                admitted=NF),
    "KeyService/AuthenticateKey": Rpc(K, "AuthenticateKey", _authenticate),
    "KeyService/WatchKeyEvents": Rpc(K, "WatchKeyEvents", keys_pb2.WatchKeyEventsRequest(),
                                     "server"),
    "KeyService/UpdateKey": Rpc(K, "UpdateKey", keys_pb2.UpdateKeyRequest(key_id="key_nope"),
                                admitted=NF),
    "KeyService/SetOwnerLimits": Rpc(K, "SetOwnerLimits", keys_pb2.SetOwnerLimitsRequest(),
                                     admitted=BAD),
    "KeyService/ListOwnerLimits": Rpc(K, "ListOwnerLimits", keys_pb2.ListOwnerLimitsRequest()),
    "UsageService/ReportUsage": Rpc(U, "ReportUsage", usage_pb2.ReportUsageRequest()),
    "UsageService/QueryUsage": Rpc(U, "QueryUsage", usage_pb2.QueryUsageRequest()),
    "IdentityService/Discover": Rpc(ID, "Discover", identity_pb2.DiscoverRequest()),
    "IdentityService/Enroll": Rpc(ID, "Enroll", _enroll),
    "IdentityService/Renew": Rpc(ID, "Renew", _renew),
    "IdentityService/CreateEnrollment": Rpc(ID, "CreateEnrollment", identity_pb2.
        CreateEnrollmentRequest(name="never-made"), admitted=BAD),
    "IdentityService/ListEnrollments": Rpc(ID, "ListEnrollments",
                                           identity_pb2.ListEnrollmentsRequest()),
    "IdentityService/RevokeEnrollment": Rpc(ID, "RevokeEnrollment", identity_pb2.
        RevokeEnrollmentRequest(kind=identity_pb2.ENROLLMENT_KIND_FACADE, name="no-such"),
        admitted=NF),
}

AGENT_RPCS: dict[str, Rpc] = {
    "InferenceService/ChatCompletion": Rpc(INF, "ChatCompletion", _inference(
        inference_pb2.ChatCompletionRequest, {"messages": HI, "max_tokens": 2}), "server"),
    "InferenceService/Completion": Rpc(INF, "Completion", _inference(
        inference_pb2.CompletionRequest, {"prompt": "hi", "max_tokens": 2}), "server"),
    # bench/upstream.py has no /v1/embeddings: the engine's 404 comes back.
    "InferenceService/Embedding": Rpc(INF, "Embedding", _inference(
        inference_pb2.EmbeddingRequest, {"input": "hi"}), "server", admitted=NF),
    "InferenceService/Multiplex": Rpc(INF, "Multiplex", _open(1), "bidi"),
    # bench/upstream.py has no /tokenize: the engine's 404 comes back.
    "InferenceService/Inference": Rpc(INF, "Inference", _generic, "server", admitted=NF),
}
# fmt: on

# Who may call what: written out here, NOT read from kscope_common.authz.RULES,
# so that a wrong change to RULES fails this test.
_READERS = frozenset({FACADE, OPER, ADMIN})
_KEY_MANAGERS = frozenset({USER, ADMIN, OPER})
_OPERATORS = frozenset({OPER, ADMIN})
ALLOWED: dict[str, frozenset[str]] = {
    "ControlService/ListModels": _READERS,
    "ControlService/ListInstances": _READERS,
    "ControlService/ListAgents": _READERS,
    "ControlService/EnsureModel": _READERS,
    "ControlService/StopInstance": _OPERATORS,
    "ControlService/ScaleModel": _OPERATORS,
    "ControlService/WatchRoutes": frozenset({FACADE}),
    "ControlService/GetTelemetry": _READERS,
    "ControlService/ListDecisions": _READERS,
    "AgentService/Register": frozenset({HOST}),
    "AgentService/Session": frozenset({HOST}),
    "KeyService/CreateKey": _KEY_MANAGERS,
    "KeyService/ListKeys": _KEY_MANAGERS,
    "KeyService/RevokeKey": _KEY_MANAGERS,
    "KeyService/AuthenticateKey": frozenset({FACADE}),
    "KeyService/WatchKeyEvents": frozenset({FACADE}),
    "KeyService/UpdateKey": _OPERATORS,
    "KeyService/SetOwnerLimits": _OPERATORS,
    "KeyService/ListOwnerLimits": _KEY_MANAGERS,
    "UsageService/ReportUsage": frozenset({FACADE}),
    "UsageService/QueryUsage": _KEY_MANAGERS,
    "IdentityService/Discover": frozenset(ROLES),
    "IdentityService/Enroll": frozenset(ROLES),
    "IdentityService/Renew": frozenset({HOST, FACADE, OPER}),
    "IdentityService/CreateEnrollment": _OPERATORS,
    "IdentityService/ListEnrollments": _OPERATORS,
    "IdentityService/RevokeEnrollment": _OPERATORS,
    "InferenceService/ChatCompletion": frozenset({FACADE}),
    "InferenceService/Completion": frozenset({FACADE}),
    "InferenceService/Embedding": frozenset({FACADE}),
    "InferenceService/Multiplex": frozenset({FACADE}),
    "InferenceService/Inference": frozenset({FACADE}),
}


def test_the_table_lists_every_rpc() -> None:
    defined = {
        f"{service.name}/{method.name}"
        for module in (agent_pb2, control_pb2, identity_pb2, inference_pb2, keys_pb2, usage_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert defined == set(ALLOWED) == {*CONTROLLER_RPCS, *AGENT_RPCS}


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("rpc_name", list(CONTROLLER_RPCS))
async def test_controller_authorization_table(system: System, rpc_name: str, role: str) -> None:
    rpc, caller = CONTROLLER_RPCS[rpc_name], system.callers[role]
    async with system.controller_channel(caller) as channel:
        code = await attempt(channel, rpc, rpc.request_for(system, caller), _bearer(caller.key))
    if role in ALLOWED[rpc_name]:
        assert code == rpc.admitted, f"{role} was not let into {rpc_name}: {code.name}"
    else:
        assert code in {UNAUTH, DENIED}, f"{role} was let into {rpc_name}: {code.name}"
        assert role != ANON or code == UNAUTH


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("rpc_name", list(AGENT_RPCS))
async def test_agent_authorization_table(system: System, rpc_name: str, role: str) -> None:
    rpc, caller = AGENT_RPCS[rpc_name], system.callers[role]
    async with system.agent_channel(caller) as channel:
        code = await attempt(channel, rpc, rpc.request_for(system, caller), _bearer(caller.key))
    if role in ALLOWED[rpc_name]:
        assert code == rpc.admitted, f"{role} was not let into {rpc_name}: {code.name}"
    else:  # without a client certificate the handshake fails: a key is no use
        assert code == (NO_TLS if caller.cert is None else DENIED), f"{role}: {code.name}"


# --- the intrusions, each beside the legitimate call that works ---------------------------


async def test_anonymous_cannot_read_or_change_the_fleet(system: System) -> None:
    calls = [
        Rpc(C, "ListInstances", control_pb2.ListInstancesRequest()),
        Rpc(C, "ListAgents", control_pb2.ListAgentsRequest()),
        Rpc(C, "EnsureModel", control_pb2.EnsureModelRequest(model=MODEL)),
        Rpc(C, "StopInstance", control_pb2.StopInstanceRequest(instance_id=system.instance.id)),
    ]
    only_the_ca = grpc.aio.secure_channel(
        system.mesh, grpc.ssl_channel_credentials(system.ca_pem),
        options=[("grpc.ssl_target_name_override", CONTROLLER_DNS_NAME)],
    )  # fmt: skip
    async with system.public() as public, only_the_ca as mesh:
        for rpc in calls:
            assert await attempt(public, rpc, rpc.request_for(system, Caller(ANON))) == UNAUTH
            assert await attempt(mesh, rpc, rpc.request_for(system, Caller(ANON))) == NO_TLS
    listed = await system.as_admin(C, "ListInstances", control_pb2.ListInstancesRequest())
    assert system.instance.id in {i.id for i in listed.instances}
    agents = await system.as_admin(C, "ListAgents", control_pb2.ListAgentsRequest())
    assert system.agent.address in {a.address for a in agents.agents}
    ensured = await system.as_admin(C, "EnsureModel", control_pb2.EnsureModelRequest(model=MODEL))
    assert ensured.model.name == MODEL
    ready = _ready(system.controller)  # the anonymous StopInstance did nothing
    assert ready is not None and ready.id == system.instance.id


async def test_only_a_facade_may_call_an_agent(system: System) -> None:
    for role, refused in ((ANON, NO_TLS), (ADMIN, NO_TLS), (HOST, DENIED), (OPER, DENIED)):
        caller = system.callers[role]
        async with system.agent_channel(caller) as channel:
            for name in ("InferenceService/ChatCompletion", "InferenceService/Multiplex"):
                rpc = AGENT_RPCS[name]
                code = await attempt(channel, rpc, rpc.request_for(system, caller))
                assert code == refused, f"{role} {name}: {code.name}"
    request = AGENT_RPCS["InferenceService/ChatCompletion"].request_for(system, Caller(FACADE))
    async with system.agent_channel(system.callers[FACADE]) as channel:
        stub: Any = INF(channel)
        replies = [r async for r in stub.ChatCompletion(request, timeout=10)]
        body = json.loads(b"".join(c for r in replies for c in r.chunks))
        assert body["choices"][0]["message"]["content"]
        call = stub.Multiplex(timeout=10)
        await call.write(_open(7))
        frames: list[inference_pb2.MultiplexFrame] = []
        while not any(f.end for f in frames):
            frames += (await call.read()).frames
        call.cancel()
    assert all(f.stream_id == 7 and not f.error_code for f in frames)
    assert json.loads(b"".join(c for f in frames for c in f.chunks))["choices"]


async def test_an_enrollment_token_is_not_an_admin_credential(system: System) -> None:
    token = system.controller.enrollment_token("facade", "token-as-key")
    admin_key = keys_pb2.CreateKeyRequest(owner="mallory", name="x", role=keys_pb2.KEY_ROLE_ADMIN)
    async with system.public() as channel:
        for rpc in (Rpc(K, "CreateKey", admin_key),
                    Rpc(C, "ListInstances", control_pb2.ListInstancesRequest())):  # fmt: skip
            assert await attempt(channel, rpc, rpc.request_for(system, Caller(ANON)),
                                 _bearer(token)) == UNAUTH  # fmt: skip
    made = await system.as_admin(K, "CreateKey", admin_key)
    assert made.secret.startswith("ks-")
    # It is good for what it is for: enrolling a facade.
    assert (await enroll(system.controller.address, system.ca_pem, token)).certificate


async def test_a_host_agent_cannot_register_or_report_for_an_instance(system: System) -> None:
    live = system.instance.id
    async with system.controller_channel(system.callers[HOST]) as channel:
        stub: Any = AG(channel)
        for as_host in (False, True):
            request = agent_pb2.RegisterRequest(instance_id=live, address="127.0.0.1:9",
                                                host_agent=as_host)  # fmt: skip
            assert await attempt(channel, Rpc(AG, "Register", request), request) == DENIED
        # Nor speak in the live agent's Session.
        hello = agent_pb2.SessionRequest(hello=agent_pb2.SessionHello(agent_id=system.agent.id))
        assert await attempt(channel, Rpc(AG, "Session", hello, "bidi"), hello) == DENIED
        # What a host identity is for works.
        reply = await stub.Register(agent_pb2.RegisterRequest(
            host_agent=True, address="127.0.0.1:9", hostname="sec-host"), timeout=5)  # fmt: skip
        assert reply.agent_id.startswith("host-")
    (inst,) = [i for i in system.controller.list_instances(MODEL) if i.id == live]
    assert (inst.agent_id, inst.agent_address) == (system.agent.id, system.agent.address)


async def test_an_instance_token_is_one_time_and_bound_to_its_instance(system: System) -> None:
    """A fake host agent offers HOSTED, so the controller hands it the one-time
    token of the instance it asks it to load."""
    launcher = await system.enrolled("host", "sec-launcher")
    async with launcher.controller_channel(system.mesh) as channel:
        stub: Any = AG(channel)
        host = await stub.Register(agent_pb2.RegisterRequest(
            host_agent=True, address="127.0.0.1:9", hostname="sec-launcher", models=[HOSTED],
            memory_bytes=1 << 34), timeout=5)  # fmt: skip
        session = stub.Session(timeout=30)
        await session.write(agent_pb2.SessionRequest(hello=agent_pb2.SessionHello(
            agent_id=host.agent_id)))  # fmt: skip
        # The revoked list comes first, once the controller holds the session.
        command = await session.read()
        assert command.WhichOneof("command") == "revoked"
        await system.as_admin(C, "EnsureModel", control_pb2.EnsureModelRequest(model=HOSTED))
        while command.WhichOneof("command") != "load_model":
            command = await asyncio.wait_for(session.read(), 10)
        load = command.load_model
        assert load.enroll_token.startswith(f"kse1.instance.{load.instance_id}.")
        try:
            first = await enroll(system.controller.address, system.ca_pem, load.enroll_token)
            assert first.certificate.identity.uri == agent_instance(load.instance_id).uri
            with pytest.raises(EnrollmentError, match=r"PERMISSION_DENIED.*already used"):
                await enroll(system.controller.address, system.ca_pem, load.enroll_token)
            # Its certificate registers for its own instance, not for another.
            async with first.certificate.controller_channel(system.mesh) as own:
                other = agent_pb2.RegisterRequest(instance_id=system.instance.id,
                                                  address="127.0.0.1:9")  # fmt: skip
                assert await attempt(own, Rpc(AG, "Register", other), other) == DENIED
                mine = agent_pb2.RegisterRequest(instance_id=load.instance_id,
                                                 address="127.0.0.1:9")  # fmt: skip
                assert await attempt(own, Rpc(AG, "Register", mine), mine) == OK
        finally:
            session.cancel()
            stop = control_pb2.StopInstanceRequest(instance_id=load.instance_id)
            await system.as_admin(C, "StopInstance", stop)


async def test_a_user_key_makes_only_narrower_keys_that_die_with_it(system: System) -> None:
    parent = await system.as_admin(K, "CreateKey", keys_pb2.CreateKeyRequest(
        owner="ulla", name="parent", models=[MODEL], expires_in_seconds=86400))  # fmt: skip
    ten_years = 10 * 365 * 86400
    async with system.public() as channel:
        keys: Any = K(channel)
        for wider in (
            keys_pb2.CreateKeyRequest(name="all-models"),
            keys_pb2.CreateKeyRequest(name="star", models=["*"]),
            keys_pb2.CreateKeyRequest(name="other", models=["other-model"]),
            keys_pb2.CreateKeyRequest(name="long", models=[MODEL], expires_in_seconds=ten_years),
            keys_pb2.CreateKeyRequest(name="admin", models=[MODEL], role=keys_pb2.KEY_ROLE_ADMIN),
            keys_pb2.CreateKeyRequest(owner="someone-else", name="theirs", models=[MODEL]),
        ):
            code = await attempt(channel, Rpc(K, "CreateKey", wider), wider, _bearer(parent.secret))
            assert code == DENIED, wider.name
        child = await keys.CreateKey(keys_pb2.CreateKeyRequest(name="child", models=[MODEL],
            expires_in_seconds=3600), metadata=_bearer(parent.secret), timeout=5)  # fmt: skip
    assert child.key.owner == "ulla" and list(child.key.models) == [MODEL]
    check = keys_pb2.AuthenticateKeyRequest(secret=child.secret)
    rpc = Rpc(K, "AuthenticateKey", check)
    async with system.controller_channel(system.callers[FACADE]) as mesh:
        assert await attempt(mesh, rpc, check) == OK
        await system.as_admin(K, "RevokeKey", keys_pb2.RevokeKeyRequest(key_id=parent.key.id))
        assert await attempt(mesh, rpc, check) == UNAUTH


def test_the_controller_refuses_a_ca_certificate_without_its_key(system: System) -> None:
    port_file = system.tmp / "bad-ca.port"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KSCOPE_TLS_")}
    env["KSCOPE_TLS_CA_CERT"] = str(system.controller.ca_path)
    done = subprocess.run(
        [PYTHON, "-m", "controller.main", "--port", "0", "--port-file", str(port_file),
         "--state-dir", str(system.tmp / "bad-ca-state"), "--catalog",
         str(system.controller.catalog)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert not port_file.exists(), "it listened"
    assert "KSCOPE_TLS_CA_KEY" in output, output
    assert "Traceback" not in output, f"not a clear message:\n{output[-3000:]}"


async def test_plaintext_is_refused_on_every_port(system: System) -> None:
    discover = identity_pb2.DiscoverRequest()
    rpc = Rpc(ID, "Discover", discover)
    for address in (system.controller.address, system.mesh, system.agent.address):
        async with grpc.aio.insecure_channel(address) as channel:
            code = await attempt(channel, rpc, discover, timeout_s=3)
            assert code == NO_TLS, f"{address}: {code.name}"
    async with system.public() as channel:
        assert await attempt(channel, rpc, discover) == OK


async def test_health_is_open_but_only_over_tls(system: System) -> None:
    request = health_pb2.HealthCheckRequest(service="kscope.v1.ControlService")
    async with system.public() as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(request, timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    rpc = Rpc(health_pb2_grpc.HealthStub, "Check", request)
    async with grpc.aio.insecure_channel(system.controller.address) as channel:
        assert await attempt(channel, rpc, request, timeout_s=3) == NO_TLS


# --- enrollment ----------------------------------------------------------------------------


async def _enroll_code(system: System, token: str, identity: Identity | None = None) -> str:
    """How an Enroll for `identity` (default: the token's) ends: a status code name."""
    csr = make_csr(new_private_key(), identity or token_identity(token)).decode()
    request = identity_pb2.EnrollRequest(token=token, csr_pem=csr)
    async with system.public() as channel:
        return (await attempt(channel, Rpc(ID, "Enroll", request), request)).name


async def test_a_facade_token_is_reusable(system: System) -> None:
    token = system.controller.enrollment_token("facade", "twice")
    first = await enroll(system.controller.address, system.ca_pem, token)
    second = await enroll(system.controller.address, system.ca_pem, token)
    assert first.certificate.identity == second.certificate.identity
    assert first.certificate.identity.uri == "spiffe://kscope/facade/twice"
    assert first.certificate.cert_pem != second.certificate.cert_pem
    assert first.mesh_address == system.mesh
    listed = await system.as_admin(ID, "ListEnrollments", identity_pb2.ListEnrollmentsRequest())
    (record,) = [e for e in listed.enrollments if e.name == "twice"]
    assert record.uses == 2


async def test_an_expired_enrollment_token_is_refused(system: System) -> None:
    token = system.controller.enrollment_token("facade", "short-lived", expires_in_s=1)
    await asyncio.sleep(1.5)
    with pytest.raises(EnrollmentError, match=r"PERMISSION_DENIED.*expired"):
        await enroll(system.controller.address, system.ca_pem, token)


async def test_a_csr_for_another_identity_is_refused(system: System) -> None:
    token = system.controller.enrollment_token("facade", "csr-a")
    for other in (Identity(Role.FACADE, "csr-b"), Identity(Role.OPERATOR, "csr-a"),
                  agent_instance(system.instance.id)):  # fmt: skip
        assert await _enroll_code(system, token, other) == "PERMISSION_DENIED", other
    assert await _enroll_code(system, token) == "OK"


async def test_garbage_and_revoked_tokens_are_refused(system: System) -> None:
    for garbage in ("", "nonsense", "ks-abc", "kse1.facade.csr-a.not-the-secret",
                    f"kse1.instance.{system.instance.id}.guessed"):  # fmt: skip
        identity = None if garbage.startswith("kse1.") else Identity(Role.FACADE, "x")
        assert await _enroll_code(system, garbage, identity) == "PERMISSION_DENIED", garbage
    token = system.controller.enrollment_token("host", "to-revoke")
    assert await _enroll_code(system, token) == "OK"
    system.controller.revoke("host", "to-revoke")
    assert await _enroll_code(system, token) == "PERMISSION_DENIED"


# --- revocation ----------------------------------------------------------------------------


async def _until_closed(call: Any, limit_s: float) -> tuple[float, grpc.StatusCode]:
    """Read a stream until it ends, at most limit_s + 2 s: (seconds, status)."""
    started = time.monotonic()
    try:
        while True:
            left = limit_s + 2.0 - (time.monotonic() - started)
            if await asyncio.wait_for(call.read(), max(left, 0.01)) is grpc.aio.EOF:  # type: ignore[attr-defined]
                return time.monotonic() - started, OK
    except grpc.aio.AioRpcError as exc:
        return time.monotonic() - started, exc.code()
    except TimeoutError:
        call.cancel()
        return time.monotonic() - started, grpc.StatusCode.DEADLINE_EXCEEDED


async def test_revoking_a_facade_closes_its_controller_streams(system: System) -> None:
    cert = await system.enrolled("facade", "rev-watch")
    list_models = Rpc(C, "ListModels", control_pb2.ListModelsRequest())
    async with cert.controller_channel(system.mesh) as channel:
        watch: Any = C(channel)
        call = watch.WatchRoutes(control_pb2.WatchRoutesRequest(), timeout=30)
        table: Any = await call.read()
        assert MODEL in {r.model.name for r in table.routes}
        await asyncio.to_thread(system.controller.revoke, "facade", "rev-watch")
        took, code = await _until_closed(call, 1.0)
        assert code == UNAUTH and took < 1.0, (code, took)
        assert await attempt(channel, list_models, control_pb2.ListModelsRequest()) == UNAUTH
    async with cert.controller_channel(system.mesh) as fresh:  # a new connection too
        renew = _renew(system, Caller("revoked", cert))
        assert await attempt(fresh, Rpc(ID, "Renew", renew), renew) == UNAUTH


async def test_revoking_a_facade_closes_its_agent_streams(system: System) -> None:
    cert = await system.enrolled("facade", "rev-mux")
    chat = AGENT_RPCS["InferenceService/ChatCompletion"]
    async with cert.agent_channel(system.agent.address, agent_instance(system.instance.id)) as ch:
        stub: Any = INF(ch)
        call = stub.Multiplex(timeout=60)
        await call.write(_open(1, LONG_STREAM))
        first = await call.read()
        assert first.frames and not first.frames[0].end
        await asyncio.to_thread(system.controller.revoke, "facade", "rev-mux")
        took, code = await _until_closed(call, 1.5)
        assert code == UNAUTH and took < 1.5, (code, took)
        assert await attempt(ch, chat, chat.request_for(system, Caller("revoked"))) == UNAUTH
    # Another facade's calls go on.
    async with system.agent_channel(system.callers[FACADE]) as ch:
        assert await attempt(ch, chat, chat.request_for(system, Caller(FACADE))) == OK


# --- secrets -------------------------------------------------------------------------------


def _pids(system: System) -> dict[str, int]:
    """The agent's and the facade's process ids."""
    agent = int(system.instance.launcher_ref.partition(":")[0])
    assert Path(f"/proc/{agent}").exists(), "the agent is not running"
    return {"agent": agent, "facade": system.facade.proc.pid}


def test_no_secret_on_a_command_line(system: System) -> None:
    for name, pid in _pids(system).items():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert b"kse1." not in cmdline and b"ks-" not in cmdline, (name, cmdline)


def test_no_enrollment_token_in_a_process_environment(system: System) -> None:
    """/proc/PID/environ is the environment the process was started with:
    removing a variable from os.environ does not remove it from there."""
    leaks = [
        f"{name}: {entry.partition(b'=')[0].decode()}"
        for name, pid in _pids(system).items()
        for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if b"kse1." in entry
    ]
    assert not leaks, f"enrollment tokens readable in /proc/PID/environ: {leaks}"


def test_secret_files_are_private(system: System) -> None:
    state = system.controller.state_dir
    modes = {p: stat.S_IMODE((state / p).stat().st_mode)
             for p in (".", "tls", "admin-key", "tls/ca-key.pem", "tls/ca.pem")}  # fmt: skip
    assert modes == {".": 0o700, "tls": 0o700, "admin-key": 0o600, "tls/ca-key.pem": 0o600,
                     "tls/ca.pem": 0o644}  # fmt: skip  # ca.pem is public: operators copy it


def test_logs_hold_no_tokens_or_keys(system: System) -> None:
    logs = {
        "controller": system.controller.proc.log(),
        "facade": system.facade.proc.log(),
        "agent": (system.controller.state_dir / "logs" / f"{system.instance.id}.log").read_text(),
    }
    secrets = [system.controller.admin_key, system.callers[USER].key, system.enroll_token]
    for name, text in logs.items():
        assert text, f"the {name} log is empty"
        assert "kse1." not in text, f"an enrollment token in the {name} log"
        assert not [s for s in secrets if s in text], f"a key in the {name} log"


# --- operators: the CLI and grpcurl --------------------------------------------------------


def _cli(system: System, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KSCOPE_")}
    return subprocess.run(
        [PYTHON, "-m", "kscope_cli.main", *args, "--controller", system.controller.address,
         "--ca", str(system.controller.ca_path)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_the_cli_lists_instances_with_an_admin_key_only(system: System) -> None:
    done = _cli(system, "instances", "--key", system.controller.admin_key, "--json")
    assert done.returncode == 0, done.stderr
    assert system.instance.id in {i["id"] for i in json.loads(done.stdout)}
    anonymous = _cli(system, "instances", "--json")
    assert anonymous.returncode == 1 and "UNAUTHENTICATED" in anonymous.stderr
    user = _cli(system, "instances", "--key", system.callers[USER].key, "--json")
    assert user.returncode == 1 and "PERMISSION_DENIED" in user.stderr


def _grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GRPCURL, "-max-time", "10", *args], capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def test_grpcurl_with_the_ca_and_an_admin_key(system: System) -> None:
    address, ca = system.controller.address, str(system.controller.ca_path)
    bearer = f"authorization: Bearer {system.controller.admin_key}"
    # 127.0.0.1 is in the controller's certificate: no -servername needed.
    listed = _grpcurl("-cacert", ca, "-H", bearer, address, "list")
    assert listed.returncode == 0, listed.stderr
    assert {f"kscope.v1.{s}" for s in ("ControlService", "KeyService", "IdentityService",
            "AgentService")} <= set(listed.stdout.split())  # fmt: skip
    described = _grpcurl("-cacert", ca, "-H", bearer, address, "describe",
                         "kscope.v1.ControlService")  # fmt: skip
    assert described.returncode == 0 and "rpc ListInstances" in described.stdout, described
    called = _grpcurl("-cacert", ca, "-H", bearer, address,
                      "kscope.v1.ControlService/ListInstances")  # fmt: skip
    assert called.returncode == 0 and system.instance.id in called.stdout, called.stderr


def test_grpcurl_without_a_key_or_without_tls_is_refused(system: System) -> None:
    address, ca = system.controller.address, str(system.controller.ca_path)
    bearer = f"authorization: Bearer {system.controller.admin_key}"
    for args in (("list",), ("kscope.v1.ControlService/ListInstances",)):
        anonymous = _grpcurl("-cacert", ca, address, *args)
        assert anonymous.returncode != 0 and "Unauthenticated" in anonymous.stderr, anonymous
    assert _grpcurl("-plaintext", "-H", bearer, address, "list").returncode != 0
    unverified = _grpcurl("-H", bearer, address, "list")  # the system's CAs, not ours
    assert unverified.returncode != 0 and "certificate" in unverified.stderr, unverified.stderr
