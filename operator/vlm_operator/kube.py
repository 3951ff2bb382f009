"""The operator's one door to the Kubernetes API (kopf's own watches and patches aside).

The official `kubernetes` client does the HTTP (auth, TLS, token refresh), called through
a small thread pool so that no handler blocks the event loop. Connection settings come
from the same place kubectl reads them: in-cluster service account first, else
`$KUBECONFIG` / `~/.kube/config` (`configure()`; kopf logs in the same way in
`handlers.login`).

Everything is generic over `{apiVersion, kind}` so that new child kinds (e.g. the
rendezvous store's Deployment + Service) need only a line in `KINDS`.

Semantics the rest of the operator relies on:
- `create()` treats 409 AlreadyExists as success and returns the stored object, so a
  retried or repeated create never makes a second object (names are deterministic);
- 429 and 5xx (and dropped connections) are retried a few times with backoff, honouring
  `Retry-After`; what still fails surfaces as `ApiError(retryable=True)`, which the
  handlers turn into `kopf.TemporaryError`;
- a 404 for a whole resource type (CRD not installed) is `ResourceMissing`, distinct from
  a 404 for one object (`NotFound`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import datetime
import json
import logging
import os
import random
import socket
import time
import warnings
from typing import Any

from . import metrics

log = logging.getLogger(__name__)

# kubernetes-client 36 calls urllib3's deprecated HTTPResponse.getheaders() (urllib3 1.26 and 2.x
# alike): harmless, once per error response.
warnings.filterwarnings("ignore", message=r"HTTPResponse\.getheaders\(\) is deprecated", category=DeprecationWarning)

RETRYABLE = frozenset({429, 500, 502, 503, 504})
COMPONENT = "vlm-pretrain-operator"
USER_AGENT = f"{COMPONENT}/0.1.0"


@dataclasses.dataclass(frozen=True)
class Kind:
    group: str
    version: str
    plural: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def resource(self) -> str:
        """`plural.group` as RBAC and metrics name it."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def path(self, namespace: str | None = None, name: str | None = None, subresource: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
            if subresource:
                base += f"/{subresource}"
        return base


KINDS: dict[str, Kind] = {
    "ConfigMap": Kind("", "v1", "configmaps"),
    "Service": Kind("", "v1", "services"),
    "Pod": Kind("", "v1", "pods"),
    "Event": Kind("", "v1", "events"),
    "Deployment": Kind("apps", "v1", "deployments"),
    "PodDisruptionBudget": Kind("policy", "v1", "poddisruptionbudgets"),
    "NetworkPolicy": Kind("networking.k8s.io", "v1", "networkpolicies"),
    "PyTorchJob": Kind("kubeflow.org", "v1", "pytorchjobs"),
    "PodMonitor": Kind("monitoring.coreos.com", "v1", "podmonitors"),
    "VLMPretrainRun": Kind("pretrain.vlm.dev", "v1alpha1", "vlmpretrainruns"),
    "Workload": Kind("kueue.x-k8s.io", "v1beta1", "workloads"),  # read and spec.active only (day2.workload_patch)
    "VLMPretrainSweep": Kind("pretrain.vlm.dev", "v1alpha1", "vlmpretrainsweeps"),
}


def kind_of(obj: dict) -> Kind:
    kind = KINDS[obj["kind"]]
    if obj.get("apiVersion", kind.api_version) != kind.api_version:
        raise ValueError(f"{obj['kind']}: expected apiVersion {kind.api_version}, got {obj.get('apiVersion')}")
    return kind


class ApiError(Exception):
    """A failed API call, after the retries this module does itself."""

    def __init__(self, status: int, reason: str = "", message: str = "", details: dict | None = None,
                 retry_after: float | None = None):
        super().__init__(f"{status} {reason}: {message}".strip())
        self.status = status
        self.reason = reason
        self.message = message
        self.details = details or {}
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.status in RETRYABLE or self.status == 0


class NotFound(ApiError):
    """One object is absent."""


class ResourceMissing(NotFound):
    """The resource type is not served: its CRD is not installed."""


class Conflict(ApiError):
    """409: already exists, or a resourceVersion precondition failed."""


def _error_from(exc: Any) -> ApiError:
    status = int(getattr(exc, "status", 0) or 0)
    body: dict = {}
    try:
        body = json.loads(getattr(exc, "body", None) or "{}")
    except (TypeError, ValueError):
        body = {}
    if not isinstance(body, dict):
        body = {}
    headers = getattr(exc, "headers", None) or {}
    retry_after = None
    try:
        raw = headers.get("Retry-After") if hasattr(headers, "get") else None
        retry_after = float(raw) if raw is not None else None
    except (TypeError, ValueError):
        retry_after = None
    reason = str(body.get("reason") or getattr(exc, "reason", "") or "")
    message = str(body.get("message") or "")
    details = body.get("details") if isinstance(body.get("details"), dict) else {}
    cls = ApiError
    if status == 404:
        # An object 404 names the object; an unknown resource type names nothing.
        cls = NotFound if details.get("name") else ResourceMissing
    elif status == 409:
        cls = Conflict
    return cls(status, reason, message, details, retry_after)


def load_configuration():
    """Connection settings the way kubectl finds them: in-cluster, else kubeconfig."""
    import kubernetes

    cfg = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=cfg)
    except kubernetes.config.ConfigException:
        # $KUBECONFIG is read now, not when the kubernetes package was imported.
        kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None, client_configuration=cfg)
    return cfg


def bearer(cfg) -> tuple[str | None, str | None]:
    """(scheme, token) from a client Configuration (either place the client keeps it)."""
    header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
    parts = header.split(" ", 1) if header else []
    if not parts:
        return None, None
    return (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])


class Client:
    """Async facade over the sync official client (a dedicated thread pool, no loop blocking)."""

    def __init__(self, configuration: Any = None, *, threads: int = 16, retries: int = 3,
                 base_delay: float = 0.05, max_delay: float = 2.0, timeout: float = 30.0):
        import kubernetes

        if configuration is None:
            configuration = load_configuration()
        configuration.connection_pool_maxsize = max(threads, getattr(configuration, "connection_pool_maxsize", 1) or 1)
        # One retry policy for the API, call()'s: urllib3 would otherwise retry a dropped
        # connection 3 more times underneath each of its attempts.
        configuration.retries = False
        self.host = configuration.host
        self._api = kubernetes.client.ApiClient(configuration)
        self._api.user_agent = USER_AGENT
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kube-api")
        self._retries = retries
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._timeout = timeout
        self._discovery: dict[str, tuple[float, frozenset[str]]] = {}

    def close(self, *, abort: bool = True) -> None:
        """Stop taking calls; `abort` also drops queued ones (calls in flight finish)."""
        self._pool.shutdown(wait=False, cancel_futures=abort)

    # ------------------------------------------------------------------ transport

    def _call_sync(self, method: str, path: str, body: Any, query: list | None, content_type: str | None) -> Any:
        from kubernetes.client.rest import ApiException
        import urllib3

        headers = {"Accept": "application/json", "Content-Type": content_type or "application/json"}
        try:
            resp = self._api.call_api(
                path, method, query_params=query or [], header_params=headers, body=body,
                auth_settings=["BearerToken"], _preload_content=False, _return_http_data_only=True,
                _request_timeout=self._timeout,
            )
        except ApiException as exc:
            raise _error_from(exc) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ApiError(0, "ConnectionError", str(exc)) from None
        data = resp.data
        return json.loads(data) if data else None

    async def call(self, verb: str, kind: Kind, method: str, path: str, *, body: Any = None,
                   query: list | None = None, content_type: str | None = None) -> Any:
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            try:
                return await loop.run_in_executor(self._pool, self._call_sync, method, path, body, query, content_type)
            except ApiError as exc:
                metrics.API_ERRORS.labels(verb=verb, resource=kind.resource, code=str(exc.status)).inc()
                if not exc.retryable or attempt >= self._retries:
                    raise
                delay = exc.retry_after if exc.retry_after is not None else self._base_delay * (2 ** attempt)
                delay = min(self._max_delay, delay) * (0.5 + random.random() / 2)
                attempt += 1
                log.debug("%s %s failed with %s; retry %d in %.2fs", verb, path, exc.status, attempt, delay)
                await asyncio.sleep(delay)

    # ------------------------------------------------------------------ verbs

    async def get(self, kind_name: str, namespace: str | None, name: str) -> dict | None:
        kind = KINDS[kind_name]
        try:
            return await self.call("get", kind, "GET", kind.path(namespace, name))
        except ResourceMissing:
            return None
        except NotFound:
            return None

    async def list(self, kind_name: str, namespace: str | None, label_selector: str | None = None) -> list[dict]:
        kind = KINDS[kind_name]
        query = [("labelSelector", label_selector)] if label_selector else []
        out = await self.call("list", kind, "GET", kind.path(namespace), query=query)
        return list((out or {}).get("items") or [])

    async def create(self, obj: dict) -> tuple[dict, bool]:
        """Create; 409 AlreadyExists is success. Returns (the stored object, created?)."""
        kind = kind_of(obj)
        meta = obj["metadata"]
        try:
            return await self.call("create", kind, "POST", kind.path(meta.get("namespace")), body=obj), True
        except Conflict:
            existing = await self.get(obj["kind"], meta.get("namespace"), meta["name"])
            if existing is None:  # conflicted with an object that is gone again: let the caller retry
                raise ApiError(409, "Conflict", f"{obj['kind']} {meta['name']} conflicted but is absent") from None
            return existing, False

    async def patch(self, kind_name: str, namespace: str | None, name: str, patch: dict,
                    subresource: str | None = None) -> dict:
        kind = KINDS[kind_name]
        return await self.call(
            "patch", kind, "PATCH", kind.path(namespace, name, subresource), body=patch,
            content_type="application/merge-patch+json",
        )

    async def delete(self, kind_name: str, namespace: str | None, name: str, *, uid: str | None = None) -> bool:
        """Delete with background propagation (its pods go too); already gone is success.
        `uid`: only that object (a precondition: 409 if the name now holds another, which
        counts as gone). Returns whether this call deleted it."""
        kind = KINDS[kind_name]
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            await self.call("delete", kind, "DELETE", kind.path(namespace, name), body=body)
        except (NotFound, ResourceMissing, Conflict):
            return False
        return True

    async def patch_status(self, kind_name: str, namespace: str, name: str, status: dict) -> dict:
        """Writes only through the status subresource (never the main endpoint)."""
        return await self.patch(kind_name, namespace, name, {"status": status}, subresource="status")

    # ------------------------------------------------------------------ discovery

    async def served(self, kind_name: str, ttl: float = 30.0) -> bool:
        """Whether the API serves this kind now (i.e. its CRD is installed). Cached for `ttl`.
        Unknown (discovery itself failing) counts as served: the create call will tell."""
        kind = KINDS[kind_name]
        now = time.monotonic()
        cached = self._discovery.get(kind.api_version)
        if cached is None or now - cached[0] > ttl:
            path = f"/apis/{kind.api_version}" if kind.group else f"/api/{kind.version}"
            try:
                out = await self.call("get", kind, "GET", path)
                names = frozenset(r.get("name", "") for r in (out or {}).get("resources") or [])
            except NotFound:
                names = frozenset()
            except ApiError:
                return True if cached is None else kind.plural in cached[1]
            cached = (now, names)
            self._discovery[kind.api_version] = cached
        return kind.plural in cached[1]

    def forget(self, kind_name: str) -> None:
        """Drop the cached discovery answer (after a 404 that contradicted it)."""
        self._discovery.pop(KINDS[kind_name].api_version, None)

    # ------------------------------------------------------------------ events

    async def post_event(self, involved: dict, type_: str, reason: str, message: str) -> None:
        """A core/v1 Event about `involved` (a run). Failures are logged, never raised."""
        meta = involved.get("metadata") or {}
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            # kubectl-style name: <object>.<hex nanoseconds> (+ random bits against same-ns collisions)
            "metadata": {"name": f"{meta.get('name')}.{time.time_ns():x}{random.getrandbits(16):04x}",
                         "namespace": meta.get("namespace") or "default"},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion", KINDS["VLMPretrainRun"].api_version),
                "kind": involved.get("kind", "VLMPretrainRun"),
                "name": meta.get("name"),
                "namespace": meta.get("namespace") or "default",
                "uid": meta.get("uid", ""),
            },
            "reason": reason,
            "message": message[:1024],
            "type": type_,
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": _HOST,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self.create(event)
        except ApiError as exc:
            log.warning("could not post event %s/%s: %s", reason, meta.get("name"), exc)


_HOST = socket.gethostname()[:128]

# The operator's client: (re)built at login (handlers.login), used by every module.
CLIENT: Client | None = None


def configure(configuration: Any = None) -> Client:
    global CLIENT
    old, CLIENT = CLIENT, Client(configuration if configuration is not None else load_configuration())
    if old is not None:
        old.close(abort=False)  # a re-login: let calls in flight finish on the old client
    return CLIENT


def client() -> Client:
    if CLIENT is None:
        return configure()
    return CLIENT


def reset() -> None:
    global CLIENT
    if CLIENT is not None:
        CLIENT.close()
    CLIENT = None
