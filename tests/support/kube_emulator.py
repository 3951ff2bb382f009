"""A Kubernetes API realistic enough for kopf, served over real HTTP for tests.

kmock 0.8's KubernetesEmulator is an in-memory JSON store; kopf and our operator
rely on more of the API server's contract than it models (listed on RealisticEmulator).
`RealisticEmulator` adds that contract; `KubeServer` serves it on 127.0.0.1 from a
background thread with its own event loop, so sync clients, kubectl and KopfRunner
(which has its own loop) can all talk to it like to a cluster.

Not modelled (check these another way): schema validation/defaulting/pruning,
garbage collection of owned objects, namespace existence, RBAC, strategic-merge
list semantics (treated as a merge patch), server-side apply, pagination.
"""
from __future__ import annotations

import asyncio
import copy
import datetime
import inspect
import json
import pathlib
import random
import re
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import aiohttp.test_utils
import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock
import kubernetes.client
import pytest
from kmock._internal import apps, enums, parsing  # private, but these are the hooks a subclass needs

_ALL_VERBS = {'get', 'list', 'watch', 'create', 'update', 'patch', 'delete'}
_REASONS = {400: 'BadRequest', 403: 'Forbidden', 404: 'NotFound', 409: 'Conflict', 410: 'Expired',
            415: 'UnsupportedMediaType', 422: 'Invalid', 429: 'TooManyRequests', 500: 'InternalError',
            503: 'ServiceUnavailable', 504: 'Timeout'}


def resource_info(kind: str, namespaced: bool = True, subresources: set[str] = frozenset(),
                  shortnames: set[str] = frozenset()) -> kmock.ResourceInfo:
    return kmock.ResourceInfo(kind=kind, singular=kind.lower(), namespaced=namespaced, verbs=_ALL_VERBS,
                              subresources=subresources, shortnames=shortnames)


# Everything the operator touches, plus what kopf itself needs (namespaces, CRDs, events).
DEFAULT_RESOURCES: dict[str, kmock.ResourceInfo] = {
    'v1/namespaces': resource_info('Namespace', namespaced=False, subresources={'status', 'finalize'}),
    'v1/pods': resource_info('Pod', subresources={'status', 'log'}),
    'v1/configmaps': resource_info('ConfigMap'),
    'v1/events': resource_info('Event'),
    'v1/services': resource_info('Service', subresources={'status'}),
    'apps/v1/deployments': resource_info('Deployment', subresources={'status', 'scale'}),
    'policy/v1/poddisruptionbudgets': resource_info('PodDisruptionBudget', subresources={'status'}),
    'networking.k8s.io/v1/networkpolicies': resource_info('NetworkPolicy'),
    'apiextensions.k8s.io/v1/customresourcedefinitions':
        resource_info('CustomResourceDefinition', namespaced=False, subresources={'status'}),
    'kubeflow.org/v1/pytorchjobs': resource_info('PyTorchJob', subresources={'status', 'scale'}),
    'monitoring.coreos.com/v1/podmonitors': resource_info('PodMonitor', subresources={'status'}),
    'pretrain.vlm.dev/v1alpha1/vlmpretrainruns':
        resource_info('VLMPretrainRun', subresources={'status'}, shortnames={'vlmrun', 'vpr'}),
    'pretrain.vlm.dev/v1alpha1/vlmpretrainsweeps':
        resource_info('VLMPretrainSweep', subresources={'status'}, shortnames={'vlmsweep', 'vps'}),
}

# kmock's URL parser crashes on /api/v1/namespaces and misreads /api/v1/namespaces/NAME
# as "a namespace, no resource" (gap 6 of the note). Parse the Namespace resource itself here.
_kmock_parse_path = parsing.parse_path


def _parse_path(path: str) -> parsing.ParsedPath:
    m = re.fullmatch(r'/api/v1/namespaces(?:/([^/]+)(?:/(status|finalize))?)?/?', path)
    return parsing.ParsedPath('', 'v1', 'namespaces', None, m[1], m[2]) if m else _kmock_parse_path(path)


parsing.parse_path = _parse_path


class ApiError(Exception):
    """An API failure rendered as a proper `Status` object, as the real API server does."""

    def __init__(self, code: int, message: str, reason: str | None = None,
                 details: dict[str, Any] | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.code, self.message, self.reason = code, message, reason or _REASONS.get(code, 'Unknown')
        self.details, self.headers = details or {}, headers or {}

    def status(self) -> dict[str, Any]:
        return {'apiVersion': 'v1', 'kind': 'Status', 'metadata': {}, 'status': 'Failure', 'code': self.code,
                'reason': self.reason, 'message': self.message, 'details': self.details}


class ApiRequest(NamedTuple):
    """One logged API call in RBAC terms (compare with a ClusterRole's rules)."""
    verb: str  # get list watch create update patch delete deletecollection
    group: str
    version: str
    resource: str
    subresource: str | None
    namespace: str | None
    name: str | None


@attrs.define
class _Fault:
    verb: str
    resource: kmock.resource
    code: int
    message: str
    reason: str | None
    headers: dict[str, str]
    times: int | None
    name: str | None
    subresource: str | None


def _verb(request: kmock.Request) -> str:
    method = request.method.value.upper()
    if method == 'GET':  # the python client sends watch=True, kmock only recognises watch=true
        if request.params.get('watch', '').lower() in ('true', '1'):
            return 'watch'
        return 'get' if request.name else 'list'
    return {'POST': 'create', 'PUT': 'update', 'PATCH': 'patch',
            'DELETE': 'delete' if request.name else 'deletecollection'}.get(method, method.lower())


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')


def _merge(target: Any, patch: Any) -> Any:  # RFC 7386 JSON merge patch
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge(result.get(key), value)
    return result


def _selector_matches(selector: str, values: dict[str, Any]) -> bool:
    """Label (or field) selector: k=v, k==v, k!=v, k, !k, k in (a,b), k notin (a,b)."""
    for term in filter(None, (t.strip() for t in re.split(r',(?![^(]*\))', selector or ''))):
        if m := re.fullmatch(r'(\S+)\s+(in|notin)\s+\((.*)\)', term):
            if (values.get(m[1]) in {v.strip() for v in m[3].split(',')}) != (m[2] == 'in'):
                return False
        elif m := re.fullmatch(r'([^!=\s]+)\s*(!=|==|=)\s*(\S*)', term):
            if (values.get(m[1]) == m[3]) != (m[2] != '!='):
                return False
        elif (term[1:].strip() in values) if term.startswith('!') else (term not in values):
            return False
    return True


def _selected(request: kmock.Request, obj: dict[str, Any]) -> bool:
    meta = obj.get('metadata', {})
    fields = {'metadata.name': meta.get('name'), 'metadata.namespace': meta.get('namespace')}
    return ((request.namespace is None or meta.get('namespace') == request.namespace)
            and (request.name is None or meta.get('name') == request.name)
            and _selector_matches(request.params.get('labelSelector', ''), meta.get('labels') or {})
            and _selector_matches(request.params.get('fieldSelector', ''), fields))


def _wants_table(request: kmock.Request) -> bool:
    accept = next((v for k, v in request.headers.items() if k.lower() == 'accept'), '')
    return 'as=Table' in accept


def _cell(obj: dict, column: dict) -> Any:
    value: Any = obj
    for part in column['jsonPath'].strip('.').split('.'):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return None
    if column.get('type') == 'date':  # the API server prints a timestamp as its age
        when = datetime.datetime.strptime(str(value), '%Y-%m-%dT%H:%M:%SZ').replace(tzinfo=datetime.timezone.utc)
        seconds = int((datetime.datetime.now(datetime.timezone.utc) - when).total_seconds())
        return f'{seconds}s' if seconds < 120 else f'{seconds // 60}m'
    return value


@attrs.define(kw_only=True)
class RealisticEmulator(kmock.KubernetesEmulator):
    """KubernetesEmulator + the API server contract kopf depends on (gaps 1-6 of the note)."""

    _rv: int = attrs.field(default=0, init=False)  # one global, monotonic resourceVersion
    _events: list[tuple[int, kmock.resource, dict]] = attrs.field(factory=list, init=False)  # for watch replay
    _watchers: list[tuple[kmock.resource, asyncio.Queue]] = attrs.field(factory=list, init=False)
    _results: dict[int, tuple[int, dict]] = attrs.field(factory=dict, init=False)  # request.id -> committed write
    _faults: list[_Fault] = attrs.field(factory=list, init=False)
    _faults_lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)  # tests add faults from their thread
    _rng: random.Random = attrs.field(factory=lambda: random.Random(0), init=False)  # deterministic uids and names

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.fallback[enums.method.PUT] << self._serve_result  # kmock maps no action to PUT
        self.fallback['get /apis/'] << self._serve_apis  # the python client asks with a trailing slash
        self.fallback['get /api/'] << self._serve_api

    # --- test-facing API -------------------------------------------------------------------
    def fail(self, verb: str, resource: str, code: int = 500, *, times: int | None = 1,
             retry_after: int | None = None, name: str | None = None, subresource: str | None = None,
             message: str = 'injected fault', reason: str | None = None) -> None:
        """Fail the next `times` (None: all) requests matching verb ('*': any) and resource
        ('configmaps', 'kubeflow.org/v1/pytorchjobs', ...) with `code`, BEFORE anything is stored.
        `subresource=None` matches main and subresource calls. A 410 on 'watch' is streamed as an
        ERROR event (as the real API server does for an expired resourceVersion)."""
        headers = {'Retry-After': str(retry_after)} if retry_after is not None else {}
        with self._faults_lock:
            self._faults.append(_Fault(verb, kmock.resource(resource), code, message, reason, headers,
                                       times, name, subresource))

    def clear_faults(self) -> None:
        with self._faults_lock:
            self._faults.clear()

    @property
    def request_log(self) -> list[ApiRequest]:
        """Every resource request served so far (including failed ones), discovery excluded."""
        return [ApiRequest(_verb(r), r.resource.group, r.resource.version, r.resource.plural,
                           r.subresource, r.namespace, r.name)
                for r in list(self._requests) if r.resource is not None and r.resource.plural]

    # --- request handling ------------------------------------------------------------------
    def _get_resources(self) -> list[kmock.resource]:
        return list(self._resources)  # discovery = declared resources only, so tests can remove one

    async def _serve_version(self, request: kmock.Request) -> dict:
        result = await super()._serve_version(request)
        result['groupVersion'] = result['groupVersion'].lstrip('/')  # kmock says '/v1'; kubectl rejects it
        return result

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.resource is None or not request.resource.plural:  # discovery, /version, non-k8s
            return await apps.RawHandler._handle(self, request)
        verb = _verb(request)
        if verb == 'watch':
            object.__setattr__(request, 'action', enums.action.WATCH)
        try:
            if fault := self._take_fault(verb, request):
                if verb == 'watch' and fault.code == 410:
                    return aiohttp.web.Response(text=json.dumps({'type': 'ERROR', 'object': fault.status()}) + '\n')
                raise fault
            if request.resource not in self._resources:
                raise ApiError(404, 'the server could not find the requested resource')
            if verb in ('create', 'update', 'patch', 'delete'):
                async with self._lock:  # the stock emulator mutates here too, but without the contract
                    self._results[request.id] = self._write(verb, request)
            # Skip KubernetesEmulator._handle (its own unlocked mutation); user DSL reactions still apply.
            return await apps.RawHandler._handle(self, request)
        except ApiError as e:
            return aiohttp.web.json_response(e.status(), status=e.code, headers=e.headers)

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        if isinstance(exc, ApiError):  # raised where _handle cannot catch it: inside a stream
            return aiohttp.web.json_response(exc.status(), status=exc.code, headers=exc.headers)
        return await super()._render_error(exc)

    def _take_fault(self, verb: str, request: kmock.Request) -> ApiError | None:
        body_name = request.data.get('metadata', {}).get('name') if isinstance(request.data, dict) else None
        with self._faults_lock:
            for fault in self._faults:
                if (fault.verb in (verb, '*') and fault.resource.check(request.resource)
                        and fault.name in (None, request.name or body_name)
                        and fault.subresource in (None, request.subresource)):
                    if fault.times is not None:
                        fault.times -= 1
                        if fault.times <= 0:
                            self._faults.remove(fault)
                    reason = fault.reason or ('AlreadyExists' if fault.code == 409 and verb == 'create' else None)
                    return ApiError(fault.code, fault.message, reason, headers=fault.headers)
        return None

    def _current(self, key: tuple) -> dict | None:
        return None if key not in self._objects or self._objects[key].deleted else copy.deepcopy(self._objects[key].raw)

    def _commit(self, key: tuple, body: dict, event_type: str) -> None:
        """Every stored change gets a new resourceVersion and one watch event, in this order."""
        self._rv += 1
        body['metadata']['resourceVersion'] = str(self._rv)
        if key in self._objects:
            self._objects[key].history.append(copy.deepcopy(body))
        else:
            self._objects[key] = copy.deepcopy(body)
        if event_type == 'DELETED':
            self._objects[key].delete()
        event = {'type': event_type, 'object': copy.deepcopy(body)}
        self._events.append((self._rv, key[0], event))
        for resource, queue in self._watchers:
            if resource == key[0]:
                queue.put_nowait(event)

    def _write(self, verb: str, request: kmock.Request) -> tuple[int, dict]:
        res, info = request.resource, self._resources[request.resource]
        has_status = 'status' in info.subresources
        if request.subresource and (request.subresource != 'status' or not has_status or verb == 'delete'):
            raise ApiError(404, f'{res.plural}/{request.subresource} is not writable here')
        data = copy.deepcopy(request.data)
        if verb == 'create':
            if not isinstance(data, dict):
                raise ApiError(400, 'the request body must be an object')
            meta = data.setdefault('metadata', {})
            ns = (request.namespace or meta.get('namespace') or 'default') if info.namespaced else None
            return 201, self._create(res, info, ns, data)
        key = (res, request.namespace if info.namespaced else None, request.name)
        old = self._current(key)
        if old is None:
            raise ApiError(404, f'{res.plural} "{request.name}" not found',
                           details={'name': request.name, 'group': res.group, 'kind': res.plural})
        if verb == 'delete':
            want = ((data if isinstance(data, dict) else {}).get('preconditions') or {}).get('uid')
            if want and want != old['metadata'].get('uid'):  # DeleteOptions.preconditions, as the API server
                raise ApiError(409, f'Precondition failed: UID in precondition: {want}, '
                                    f'UID in object meta: {old["metadata"].get("uid")}')
            if old['metadata'].get('finalizers'):  # graceful: mark it, finalizer owners clean up
                if not old['metadata'].get('deletionTimestamp'):
                    old['metadata'].update(deletionTimestamp=_now(), deletionGracePeriodSeconds=0)
                    self._commit(key, old, 'MODIFIED')
            else:
                self._commit(key, old, 'DELETED')
            return 200, old
        new = self._patch(copy.deepcopy(old), request, data) if verb == 'patch' else data
        if not isinstance(new, dict) or not isinstance(new.setdefault('metadata', {}), dict):
            raise ApiError(400, 'the resulting object is not a valid object')
        current_rv = old['metadata']['resourceVersion']
        if new['metadata'].get('resourceVersion', current_rv) != current_rv:  # optimistic concurrency
            raise ApiError(409, f'Operation cannot be fulfilled on {res.plural} "{request.name}": the object has '
                                'been modified; please apply your changes to the latest version and try again')
        if request.subresource == 'status':  # /status changes nothing but the status
            status = new.get('status')
            new = {k: v for k, v in old.items() if k != 'status'} | ({'status': status} if 'status' in new else {})
        else:  # the main endpoint ignores status where /status exists, and system-owned fields
            if has_status:
                new.pop('status', None)
                new.update({'status': old['status']} if 'status' in old else {})
            new.update(apiVersion=old['apiVersion'], kind=old['kind'])
            for field in ('name', 'namespace', 'uid', 'creationTimestamp', 'generation', 'deletionTimestamp',
                          'deletionGracePeriodSeconds', 'resourceVersion'):
                new['metadata'].pop(field, None)
                new['metadata'].update({field: old['metadata'][field]} if field in old['metadata'] else {})
        if new == old:  # no-op writes keep the resourceVersion and emit no event, as the API server does
            return 200, old
        if new.get('spec') != old.get('spec'):  # generation tracks the desired state only
            new['metadata']['generation'] = old['metadata'].get('generation', 0) + 1
        released = new['metadata'].get('deletionTimestamp') and not new['metadata'].get('finalizers')
        self._commit(key, new, 'DELETED' if released else 'MODIFIED')
        return 200, new

    def _create(self, res: kmock.resource, info: kmock.ResourceInfo, ns: str | None, body: dict) -> dict:
        meta = body['metadata']
        if not meta.get('name'):
            if not meta.get('generateName'):
                raise ApiError(422, 'metadata.name: Required value: name or generateName is required')
            while True:  # like the API server: prefix + 5 random characters (it makes the client retry)
                name = meta['generateName'] + ''.join(self._rng.choices('bcdfghjklmnpqrstvwxz2456789', k=5))
                if self._current((res, ns, name)) is None:
                    break
            meta['name'] = name
        key = (res, ns, meta['name'])
        if self._current(key) is not None:
            qualified = f'{res.plural}.{res.group}' if res.group else res.plural
            raise ApiError(409, f'{qualified} "{meta["name"]}" already exists', 'AlreadyExists',
                           details={'name': meta['name'], 'group': res.group, 'kind': res.plural})
        body.update(apiVersion=f'{res.group}/{res.version}'.lstrip('/'), kind=body.get('kind') or info.kind)
        for field in ('deletionTimestamp', 'deletionGracePeriodSeconds', 'resourceVersion'):
            meta.pop(field, None)
        meta.update(uid=str(uuid.UUID(int=self._rng.getrandbits(128), version=4)),
                    creationTimestamp=_now(), generation=1)
        if ns:
            meta['namespace'] = ns
        else:
            meta.pop('namespace', None)
        if 'status' in info.subresources:
            body.pop('status', None)  # status can only be written through /status
        self._commit(key, body, 'ADDED')
        return body

    def _patch(self, old: dict, request: kmock.Request, data: Any) -> Any:
        ctype = next((v for k, v in request.headers.items() if k.lower() == 'content-type'), '').split(';')[0].strip()
        if ctype == 'application/json-patch+json':
            try:  # `test` ops included; any failure is 422, which kopf expects for its finalizer patches
                return jsonpatch.apply_patch(old, data, in_place=False)
            except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException, TypeError) as e:
                raise ApiError(422, f'the server rejected our request due to an error in our request: {e}')
        if ctype in ('application/merge-patch+json', 'application/strategic-merge-patch+json'):
            return _merge(old, data)  # NB: strategic-merge list semantics are not modelled
        raise ApiError(415, f'the body of the request was in an unknown format: {ctype}')

    async def _serve_result(self, request: kmock.Request) -> kmock.Response:
        if request.id not in self._results:
            raise ApiError(405, 'the server does not allow this method on the requested resource')
        code, body = self._results.pop(request.id)
        return kmock.Response(status=code, payload=body)

    _serve_create = _serve_update = _serve_delete = _serve_result

    async def _serve_fetch(self, request: kmock.Request) -> dict:
        info = self._resources[request.resource]
        async with self._lock:
            obj = self._current((request.resource, request.namespace if info.namespaced else None, request.name))
        if obj is None:
            raise ApiError(404, f'{request.resource.plural} "{request.name}" not found',
                           details={'name': request.name, 'kind': request.resource.plural})
        return self._table(request, [obj]) if _wants_table(request) else obj

    def _list(self, request: kmock.Request) -> list[dict]:
        return [copy.deepcopy(obj.raw) for (res, _, _), obj in self._objects.items()
                if res == request.resource and not obj.deleted and _selected(request, obj.raw)]

    async def _serve_list(self, request: kmock.Request) -> dict:
        res = request.resource
        async with self._lock:
            items, rv = self._list(request), self._rv
        if _wants_table(request):
            return self._table(request, items)
        return {'apiVersion': f'{res.group}/{res.version}'.lstrip('/'), 'kind': f'{self._resources[res].kind}List',
                'metadata': {'resourceVersion': str(rv)}, 'items': items}

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        queue: asyncio.Queue = asyncio.Queue()
        since = request.params.get('resourceVersion', '')
        if not since.isdigit() and since:
            raise ApiError(400, f'invalid resourceVersion: {since!r}')
        async with self._lock:  # snapshot/replay and subscription are atomic: no event can fall in between
            if since not in ('', '0'):  # replay exactly the changes after that version (all are kept)
                backlog = [event for rv, res, event in self._events if rv > int(since) and res == request.resource]
            else:  # "most recent": the current state as synthetic ADDED events
                backlog = [{'type': 'ADDED', 'object': obj} for obj in self._list(request)]
                if request.params.get('sendInitialEvents') == 'true':
                    backlog.append({'type': 'BOOKMARK', 'object': {'metadata': {
                        'resourceVersion': str(self._rv), 'annotations': {'k8s.io/initial-events-end': 'true'}}}})
            watcher = (request.resource, queue)
            self._watchers.append(watcher)
        loop = asyncio.get_running_loop()
        timeout = request.params.get('timeoutSeconds')
        deadline = loop.time() + float(timeout) if timeout else None
        try:
            yield b''  # send the headers now: clients wait for them
            for event in backlog:
                if event['type'] == 'BOOKMARK' or _selected(request, event['object']):
                    yield event
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), deadline and deadline - loop.time())
                except TimeoutError:  # server-side timeoutSeconds: end the stream like the API server
                    return
                if event is None:  # resource removed from discovery, or the server is stopping
                    return
                if _selected(request, event['object']):
                    yield event
        finally:
            self._watchers.remove(watcher)

    def _table(self, request: kmock.Request, items: list[dict]) -> dict:
        """Server-side printing (`kubectl get`): a meta.k8s.io/v1 Table with the columns of the
        stored CRD's additionalPrinterColumns (Name and Age otherwise), as the API server's
        CRD table convertor renders them: simple JSONPaths, `date` columns as an age."""
        res = request.resource
        crd = self._current(self._crd_key(f'{res.group}/{res.version}/{res.plural}') or ('', None, '')) or {}
        version = next((v for v in (crd.get('spec') or {}).get('versions') or [] if v.get('name') == res.version), {})
        extra = version.get('additionalPrinterColumns') or [
            {'name': 'Age', 'type': 'date', 'jsonPath': '.metadata.creationTimestamp'}]
        columns = [{'name': 'Name', 'type': 'string', 'format': 'name', 'description': '', 'priority': 0}] + [
            {'name': c['name'], 'type': c.get('type', 'string'), 'format': c.get('format', ''),
             'description': c.get('description', ''), 'priority': c.get('priority', 0)} for c in extra]
        rows = [{'cells': [obj['metadata']['name']] + [_cell(obj, c) for c in extra],
                 'object': {'kind': 'PartialObjectMetadata', 'apiVersion': 'meta.k8s.io/v1',
                            'metadata': obj['metadata']}} for obj in items]
        return {'kind': 'Table', 'apiVersion': 'meta.k8s.io/v1', 'metadata': {'resourceVersion': str(self._rv)},
                'columnDefinitions': columns, 'rows': rows}

    def add_resource(self, key: str, info: kmock.ResourceInfo) -> None:
        """Serve a resource (call in the emulator's loop). A custom resource also gets its
        CustomResourceDefinition stored, as in a cluster, so kopf's CRD watch notices it."""
        self._resources[key] = info
        res, crd_key = kmock.resource(key), self._crd_key(key)
        if crd_key and crd_key[0] in self._resources and self._current(crd_key) is None:
            self._create(crd_key[0], self._resources[crd_key[0]], None, {'metadata': {'name': crd_key[2]}, 'spec': {
                'group': res.group, 'scope': 'Namespaced' if info.namespaced else 'Cluster',
                'names': {'plural': res.plural, 'singular': info.singular, 'kind': info.kind},
                'versions': [{'name': res.version, 'served': True, 'storage': True,
                              'subresources': {sub: {} for sub in info.subresources}}]}})

    def remove_resource(self, key: str) -> None:
        """Stop serving a resource (call in the emulator's loop): discovery and its URLs answer
        404, its watch streams end, its CustomResourceDefinition (if stored) is deleted."""
        del self._resources[key]
        self.close_watches(kmock.resource(key))
        crd_key = self._crd_key(key)
        if crd_key and (crd := self._current(crd_key)) is not None:
            self._commit(crd_key, crd, 'DELETED')

    @staticmethod
    def _crd_key(key: str) -> tuple | None:
        res = kmock.resource(key)
        if '.' not in res.group or res.group.endswith('.k8s.io'):  # built in, no CRD
            return None
        return kmock.resource('apiextensions.k8s.io/v1/customresourcedefinitions'), None, f'{res.plural}.{res.group}'

    def close_watches(self, resource: kmock.resource | None = None) -> None:
        """End the watch streams (of one resource, or all): clients see a normal end of stream."""
        for res, queue in self._watchers:
            if resource is None or res == resource:
                queue.put_nowait(None)


class KubeServer:
    """Serves a RealisticEmulator over HTTP on 127.0.0.1 from a background thread and loop.

    Use as a context manager (or the `kube` fixture). Access the emulator's state from the
    test thread through `call()`; `fail()`, `request_log` and `url` are safe to use directly.
    """

    def __init__(self, resources: dict[str, kmock.ResourceInfo] | None = None):
        self._resources = DEFAULT_RESOURCES if resources is None else resources
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name='kube-emulator', daemon=True)
        self.emulator: RealisticEmulator
        self.url = ''

    def __enter__(self) -> KubeServer:
        self._thread.start()
        self.call(self._start)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.call(self._stop)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _start(self) -> None:
        self.emulator = RealisticEmulator()
        for key, info in self._resources.items():
            self.emulator.resources[key] = copy.deepcopy(info)
        for key, info in self._resources.items():  # now that the CRD resource is declared
            self.emulator.add_resource(key, self.emulator.resources[key])
        await self.emulator.__aenter__()
        self._server = aiohttp.test_utils.RawTestServer(self.emulator, host='127.0.0.1', port=0)
        await self._server.start_server()
        self.url = f'http://127.0.0.1:{self._server.port}'

    async def _stop(self) -> None:
        self.emulator.close_watches()  # otherwise the HTTP server waits for open streams
        await self._server.close()
        await self.emulator.__aexit__(None, None, None)

    def call(self, fn: Any, *args: Any, timeout: float = 10) -> Any:
        """Run fn(*args), sync or async, in the emulator's loop; return its result."""
        async def run() -> Any:
            result = fn(*args)
            return await result if inspect.isawaitable(result) else result
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    # --- shortcuts -------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None,
                content_type: str = 'application/json') -> tuple[int, Any]:
        """One raw HTTP call, as a client outside the test would make it: (status, JSON body)."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={'Content-Type': content_type, 'User-Agent': 'vlm-tests/1'})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read() or b'null')
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b'null')

    def fail(self, *args: Any, **kwargs: Any) -> None:
        self.emulator.fail(*args, **kwargs)

    @property
    def request_log(self) -> list[ApiRequest]:
        return self.emulator.request_log

    def get(self, resource: str, namespace: str | None, name: str) -> dict | None:
        """The stored object, or None (bypasses HTTP, faults and the request log)."""
        return self.call(lambda: self.emulator._current((kmock.resource(resource), namespace, name)))

    def add_resource(self, key: str, info: kmock.ResourceInfo) -> None:
        """Serve a resource from now on ("the CRD got installed"), see RealisticEmulator.add_resource."""
        self.call(self.emulator.add_resource, key, info)

    def remove_resource(self, key: str) -> None:
        """Stop serving a resource ("the CRD is missing"), see RealisticEmulator.remove_resource."""
        self.call(self.emulator.remove_resource, key)

    def api_client(self) -> kubernetes.client.ApiClient:
        """An official-client ApiClient pointing at this server (close it, or use `with`)."""
        return kubernetes.client.ApiClient(kubernetes.client.Configuration(host=self.url))

    def write_kubeconfig(self, path: str | pathlib.Path, namespace: str = 'default') -> pathlib.Path:
        """A kubeconfig for `kubectl --kubeconfig` / `kubernetes.config` pointing at this server."""
        config = {'apiVersion': 'v1', 'kind': 'Config', 'current-context': 'kmock',
                  'clusters': [{'name': 'kmock', 'cluster': {'server': self.url}}],
                  'users': [{'name': 'kmock', 'user': {'token': 'kmock'}}],
                  'contexts': [{'name': 'kmock', 'context': {'cluster': 'kmock', 'user': 'kmock',
                                                             'namespace': namespace}}]}
        path = pathlib.Path(path)
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        return path


@pytest.fixture
def kube() -> Any:
    """A fresh emulator with DEFAULT_RESOURCES, served over HTTP for the duration of one test."""
    with KubeServer() as server:
        yield server
