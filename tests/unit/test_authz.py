"""The authorization table (kscope_common.authz.RULES) and its interceptor's
decision, without a network: a method missing from RULES is refused to
everyone, so every RPC of every KScope service must be listed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from kscope.v1 import agent_pb2, control_pb2, identity_pb2, inference_pb2, keys_pb2, usage_pb2
from kscope_common.authz import RULES, AuthzInterceptor, KeyHolder, Refusal, Right, bearer
from kscope_common.pki import ENROLLMENT_PREFIX, Identity, Role

pytestmark = pytest.mark.security

MODULES = (agent_pb2, control_pb2, identity_pb2, inference_pb2, keys_pb2, usage_pb2)


def kscope_methods() -> list[str]:
    """Every `/kscope.v1.Service/Method` the protos define."""
    return [
        f"/{service.full_name}/{method.name}"
        for module in MODULES
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]


def test_the_protos_define_the_services_we_expect() -> None:
    services = {m.split("/")[1] for m in kscope_methods()}
    assert services == {
        "kscope.v1.AgentService",
        "kscope.v1.ControlService",
        "kscope.v1.IdentityService",
        "kscope.v1.InferenceService",
        "kscope.v1.KeyService",
        "kscope.v1.UsageService",
    }


@pytest.mark.parametrize("method", kscope_methods())
def test_every_rpc_has_a_rule(method: str) -> None:
    assert method in RULES, f"{method} has no rule: it is refused to everyone"
    assert RULES[method], f"{method} has an empty rule: it is refused to everyone"


def test_no_rule_names_a_method_that_does_not_exist() -> None:
    known = set(kscope_methods())
    stale = [m for m in RULES if m.startswith("/kscope.") and m not in known]
    assert not stale


def test_health_and_reflection_have_rules() -> None:
    health = health_pb2.DESCRIPTOR.services_by_name["Health"]
    # Load balancers probe with Check, Watch and (newer) List.
    for method in ("Check", "Watch", "List"):
        assert RULES[f"/{health.full_name}/{method}"] == {Right.ANYONE}
    reflection = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
    name = f"/{reflection.full_name}/ServerReflectionInfo"
    assert Right.ANYONE not in RULES[name]


def test_only_enrollment_and_discovery_and_health_are_open() -> None:
    open_methods = {m for m, rights in RULES.items() if Right.ANYONE in rights}
    assert open_methods == {
        "/kscope.v1.IdentityService/Discover",
        "/kscope.v1.IdentityService/Enroll",
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/List",
        "/grpc.health.v1.Health/Watch",
    }


# --- the interceptor's decision, with a stand-in for the servicer context ----------------


class FakeContext:
    """Just what AuthzInterceptor.authorize reads from a grpc.aio.ServicerContext."""

    def __init__(self, identity: Identity | None = None, key: str = ""):
        self._auth: dict[str, list[bytes]] = {}
        if identity is not None:
            uris = [identity.uri.encode()]
            if identity.enrollment:
                uris.append((ENROLLMENT_PREFIX + identity.enrollment).encode())
            self._auth["peer_uri"] = uris
        self._metadata = (("authorization", f"Bearer {key}"),) if key else ()

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def invocation_metadata(self) -> Iterable[tuple[str, str]]:
        return self._metadata


KEYS = {"ks-admin": KeyHolder("root", admin=True), "ks-user": KeyHolder("uma", admin=False)}


async def _resolve(credential: str) -> KeyHolder:
    if credential not in KEYS:
        raise Refusal(grpc.StatusCode.UNAUTHENTICATED, "unknown API key")
    return KEYS[credential]


async def _decide(
    interceptor: AuthzInterceptor, method: str, context: FakeContext
) -> grpc.StatusCode:
    rights = RULES.get(method, frozenset())
    ctx: Any = context
    try:
        await interceptor.authorize(method, rights, ctx)
    except Refusal as refusal:
        return refusal.code
    return grpc.StatusCode.OK


FACADE = Identity(Role.FACADE, "edge", "enr-facade")
HOST = Identity(Role.AGENT, "host/mac", "enr-host")
OPERATOR = Identity(Role.OPERATOR, "ops", "enr-ops")
OK, DENIED, UNAUTH = (
    grpc.StatusCode.OK,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
)


@pytest.mark.parametrize(
    ("method", "identity", "key", "expected"),
    [
        ("/kscope.v1.ControlService/ListInstances", None, "", UNAUTH),
        ("/kscope.v1.ControlService/ListInstances", None, "ks-admin", OK),
        ("/kscope.v1.ControlService/ListInstances", None, "ks-user", DENIED),
        ("/kscope.v1.ControlService/ListInstances", None, "kse1.facade.x.secret", UNAUTH),
        ("/kscope.v1.ControlService/ListInstances", FACADE, "", OK),
        ("/kscope.v1.ControlService/ListInstances", HOST, "", DENIED),
        ("/kscope.v1.ControlService/StopInstance", FACADE, "", DENIED),
        ("/kscope.v1.ControlService/StopInstance", OPERATOR, "", OK),
        ("/kscope.v1.AgentService/Register", HOST, "", OK),
        ("/kscope.v1.AgentService/Register", FACADE, "", DENIED),
        ("/kscope.v1.AgentService/Register", None, "ks-admin", UNAUTH),  # needs a cert
        ("/kscope.v1.KeyService/CreateKey", None, "ks-user", OK),
        ("/kscope.v1.KeyService/CreateKey", FACADE, "", DENIED),
        ("/kscope.v1.KeyService/AuthenticateKey", None, "ks-admin", UNAUTH),
        ("/kscope.v1.KeyService/AuthenticateKey", OPERATOR, "", DENIED),
        ("/kscope.v1.IdentityService/Enroll", None, "", OK),
        ("/kscope.v1.IdentityService/Renew", None, "", UNAUTH),
        ("/kscope.v1.IdentityService/Renew", HOST, "", OK),
        ("/kscope.v1.IdentityService/CreateEnrollment", FACADE, "", DENIED),
        ("/kscope.v1.InferenceService/ChatCompletion", HOST, "", DENIED),
        ("/kscope.v1.InferenceService/ChatCompletion", FACADE, "", OK),
        ("/kscope.v1.NoSuchService/Anything", OPERATOR, "ks-admin", DENIED),
        ("/kscope.v1.NoSuchService/Anything", None, "", UNAUTH),
    ],
)
async def test_authorize(
    method: str, identity: Identity | None, key: str, expected: grpc.StatusCode
) -> None:
    interceptor = AuthzInterceptor(keys=_resolve)
    assert await _decide(interceptor, method, FakeContext(identity, key)) == expected


async def test_a_revoked_enrollment_is_unauthenticated_everywhere() -> None:
    interceptor = AuthzInterceptor(keys=_resolve)
    interceptor.revocations.replace(["enr-facade"])
    for method in ("/kscope.v1.ControlService/WatchRoutes", "/kscope.v1.IdentityService/Renew"):
        assert await _decide(interceptor, method, FakeContext(FACADE)) == UNAUTH
    # Another facade's enrollment is unaffected.
    other = Identity(Role.FACADE, "edge-2", "enr-other")
    assert await _decide(interceptor, "/kscope.v1.ControlService/WatchRoutes",
                         FakeContext(other)) == OK  # fmt: skip


async def test_an_agent_server_without_a_key_resolver_refuses_keys() -> None:
    agent_side = AuthzInterceptor()
    method = "/kscope.v1.InferenceService/Multiplex"
    assert await _decide(agent_side, method, FakeContext(None, "ks-admin")) == UNAUTH
    assert await _decide(agent_side, method, FakeContext(OPERATOR)) == DENIED
    assert await _decide(agent_side, method, FakeContext(FACADE)) == OK


def test_bearer() -> None:
    assert bearer([("authorization", "Bearer ks-1")]) == "ks-1"
    assert bearer([("authorization", "bearer  ks-2 ")]) == "ks-2"
    assert bearer([("authorization", "Basic abc")]) == ""
    assert bearer([("x-other", "Bearer ks-3")]) == ""
    assert bearer(None) == ""
