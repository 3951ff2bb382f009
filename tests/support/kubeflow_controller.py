"""The Kubeflow training operator's PyTorchJob controller (v1.9.0), as test infrastructure.

It runs in a background thread (its own asyncio loop) against the HTTP emulator
(tests/support/kube_emulator.py), watches PyTorchJobs, Pods and Services, and does what
training-operator v1.9.0 (commit 6f74c7f6b2ed6c27aabd82d0a316b23f0646059c) does, rule for
rule, read from its source (the Go is not copied; the functions named here are where each
rule lives):

- pkg/controller.v1/pytorch/pytorchjob_controller.go
  `Reconcile` (skip jobs with `runPolicy.managedBy` of another controller or a
  deletionTimestamp; `Scheme.Default` in memory only; TTL requeue through
  `DurationUntilExpireTime`), `onOwnerCreateFunc` (the Created condition, reason
  PyTorchJobCreated, "PyTorchJob NAME is created."), `UpdateJobStatus` (startTime; Master
  jobs: Running while the master runs, Succeeded when it succeeded; Worker-only jobs:
  Succeeded when all workers succeeded *or* `elasticPolicy` is set and any worker
  succeeded, else Running while any runs; failed replicas -> Restarting unless the
  replica's restartPolicy is Never, then Failed with completionTime),
  `UpdateJobStatusInApiServer` (a status *update* through /status), `IsMasterRole`
  (job-role=master for the Master, or Worker 0 in Worker-only jobs), `SetClusterSpec`.
- pkg/apis/kubeflow.org/v1/pytorch_defaults.go `SetDefaults_PyTorchJob` (cleanPodPolicy
  None, replicas 1, restartPolicy OnFailure, port `pytorchjob-port: 23456` on the `pytorch`
  container, elastic min/max from each other or from Worker replicas, nprocPerNode `auto`).
- pkg/webhooks/pytorch/pytorchjob_webhook.go `validatePyTorchJob` (see deviations).
- pkg/controller.v1/common/job.go `ReconcileJobs` (finished: `CleanUpResources` then
  active -> succeeded for a Succeeded job; suspended: clean up, active = 0, Running False
  and Suspended True with reason PyTorchJobSuspended; resumed: Suspended False with
  PyTorchJobResumed and a new startTime; backoff: `exceedsBackoffLimit` (new failed pods,
  active != total, NumRequeues+1 > backoffLimit -- NumRequeues is always 0 because v1.9
  wires a `FakeWorkQueue`) or `PastBackoffLimit`, else `PastActiveDeadline`; then
  completionTime, `DeletePodsAndServices` *before* the job is finished (so every pod goes,
  whatever cleanPodPolicy says), Failed "Job NAME has failed because it has reached the
  specified backoff limit" / "... because it was active longer than specified deadline"),
  `DeletePodsAndServices` (None keeps all; Running deletes Running and Pending pods; All
  deletes all; the Service of the same name goes with each pod), `CleanupJob`
  (ttlSecondsAfterFinished).
- pkg/core/job.go `PastBackoffLimit` (sum of init + container restartCounts of Running
  pods of OnFailure/Always/ExitCode replicas; backoffLimit 0 means any restart fails),
  `PastActiveDeadline` (now - startTime >= activeDeadlineSeconds).
- pkg/controller.v1/common/pod.go `ReconcilePods` (one pod per index, created when missing,
  deleted when its index >= replicas; a Failed pod is deleted (recreated next pass) for
  OnFailure/Always or ExitCode with a retryable code, with Restarting "job NAME is
  restarting because TYPE replica(s) failed."; ExitCode with a permanent code fails the job
  "job \\"NAME\\" is failing because \\"TYPE\\" replica(s) failed."; the exit code is the
  `pytorch` container's), `createNewPod` (labels, name `<job>-<type>-<index>`,
  ownerReference controller=true blockOwnerDeletion=true); pkg/controller.v1/control
  pod_control.go `GetPodFromTemplate` / `DeletePod` (skip pods already terminating).
- pkg/core/pod.go `SetRestartPolicy` (ExitCode -> Never), `GetPodSlices`;
  pkg/core/status.go `UpdateJobReplicaStatuses` (Running -> active, or failed when it has a
  deletionTimestamp; Succeeded; Failed); pkg/util/k8sutil `FilterActivePods`.
- pkg/util/train/train_util.go `IsRetryableExitCode` (>= 128), `IsJobSuspended`.
- pkg/controller.v1/common/service.go `ReconcileServices`, `CreateNewService` (headless,
  selector = the pod's controller labels, ports of the `pytorch` container);
  pkg/core/service.go `GetPortsFromJob`.
- pkg/util/status.go `UpdateJobConditions` / `setCondition` / `filterOutCondition` (no change
  once Failed; same status+reason is a no-op; lastTransitionTime kept when the status stays;
  Running and Restarting replace each other; Succeeded/Failed turn Running False).
- pkg/controller.v1/pytorch/envvar.go `setPodEnv` (every container: PYTHONUNBUFFERED=1;
  with a Master: MASTER_PORT, PET_MASTER_PORT, MASTER_ADDR, PET_MASTER_ADDR, WORLD_SIZE =
  replicas x int(nprocPerNode) (1 unless numeric), RANK and PET_NODE_RANK (workers: index+1);
  PET_NPROC_PER_NODE = nprocPerNode; elastic: elastic.go `Generate`: PET_RDZV_ENDPOINT
  (rdzvHost or `<job>-worker-0`, rdzvPort or the Worker's pytorchjob-port), PET_RDZV_BACKEND
  (c10d), PET_NNODES (min:max), PET_MAX_RESTARTS, PET_NPROC_PER_NODE (elastic nProcPerNode),
  PET_RDZV_ID, PET_RDZV_CONF (k=v,k=v), PET_STANDALONE; otherwise PET_NNODES = replicas).
  NB: Worker-only jobs get no MASTER_ADDR/WORLD_SIZE/RANK, elastic or not, as in v1.9.
- pkg/controller.v1/pytorch/initcontainer.go `setInitContainer` (Master jobs: workers get
  the `init-pytorch` container that waits for the master's name; image alpine:3.10, 100 tries).

Deviations (few, on purpose):
1. No admission webhook: the emulator cannot reject, so a job that `validatePyTorchJob`
   would refuse is not reconciled and its errors are kept in `controller.rejected`.
2. activeDeadlineSeconds: v1.9 asks its `FakeWorkQueue` to `AddAfter` the deadline, which
   does nothing, and sets no SyncPeriod (controller-runtime's default is 10 h), so upstream
   fails a job past its deadline only at the next reconcile some event triggers. That is
   modelled as is; `resync_period` (default None) adds controller-runtime's periodic
   resync of every job if a test wants the deadline to fire on its own.
3. State is read fresh from the API server at each reconcile (GET job, LIST pods/services)
   instead of from informer caches + expectations; the outcome is what expectations exist
   to guarantee. Replica types are reconciled Master first, then Worker (Go's map order is
   random); a Service's ports are sorted by name (Go iterates a map).
4. No Events are recorded, no metrics, no gang scheduling/PodGroups, no HPA
   (`elasticPolicy.metrics` is ignored).
"""
from __future__ import annotations

import asyncio
import copy
import datetime
import inspect
import json
import logging
import re
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

log = logging.getLogger(__name__)

JOBS = 'kubeflow.org/v1/pytorchjobs'
PODS = 'v1/pods'
SERVICES = 'v1/services'
KIND = 'PyTorchJob'
CONTROLLER_NAME = 'pytorchjob-controller'
DEFAULT_CONTAINER = 'pytorch'
DEFAULT_PORT_NAME = 'pytorchjob-port'
DEFAULT_PORT = 23456
LABEL_OPERATOR = 'training.kubeflow.org/operator-name'
LABEL_JOB = 'training.kubeflow.org/job-name'
LABEL_TYPE = 'training.kubeflow.org/replica-type'
LABEL_INDEX = 'training.kubeflow.org/replica-index'
LABEL_ROLE = 'training.kubeflow.org/job-role'
KUBEFLOW_CONTROLLER = 'kubeflow.org/training-operator'
SUPPORTED_MANAGERS = {KUBEFLOW_CONTROLLER, 'kueue.x-k8s.io/multikueue'}
INIT_CONTAINER_TEMPLATE = ("err=1;for i in $(seq {tries}); do if nslookup {addr}; then err=0 && break; fi;"
                           "echo waiting for master; sleep 2; done; exit $err")


# ======================================================================================= shared plumbing
# (also used by tests/support/kubelet.py)

def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')


def parse_time(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    return datetime.datetime.fromisoformat(value.replace('Z', '+00:00'))


def api_path(resource: str, ns: str | None = None, name: str | None = None, sub: str | None = None) -> str:
    """'v1/pods' / 'apps/v1/deployments' -> the REST path."""
    parts = resource.split('/')
    base = f'/api/{parts[0]}' if len(parts) == 2 else f'/apis/{parts[0]}/{parts[1]}'
    out = base + (f'/namespaces/{ns}' if ns else '') + f'/{parts[-1]}'
    if name:
        out += f'/{name}' + (f'/{sub}' if sub else '')
    return out


class ApiStatusError(Exception):
    def __init__(self, code: int, body: Any):
        super().__init__(f'{code}: {body.get("message") if isinstance(body, dict) else body}')
        self.code, self.body = code, body


class Api:
    """A minimal async JSON client for the emulator (one aiohttp session, no proxies)."""

    def __init__(self, url: str, user_agent: str):
        self.url, self.user_agent = url.rstrip('/'), user_agent
        self.session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
                                             headers={'User-Agent': self.user_agent}, trust_env=False)

    async def close(self) -> None:
        if self.session:
            await self.session.close()

    async def request(self, method: str, path: str, body: Any = None, ctype: str = 'application/json',
                      params: dict | None = None) -> Any:
        assert self.session is not None
        data = json.dumps(body) if body is not None else None
        async with self.session.request(method, self.url + path, data=data, params=params,
                                        headers={'Content-Type': ctype},
                                        timeout=aiohttp.ClientTimeout(total=30)) as resp:
            text = await resp.text()
            out = json.loads(text) if text else None
            if resp.status >= 300:
                raise ApiStatusError(resp.status, out)
            return out

    async def get(self, resource: str, ns: str | None, name: str) -> dict | None:
        try:
            return await self.request('GET', api_path(resource, ns, name))
        except ApiStatusError as e:
            if e.code == 404:
                return None
            raise

    async def list(self, resource: str, ns: str | None = None, selector: dict | None = None) -> tuple[list, str]:
        params = {'labelSelector': ','.join(f'{k}={v}' for k, v in sorted(selector.items()))} if selector else None
        out = await self.request('GET', api_path(resource, ns), params=params)
        return out['items'], out['metadata']['resourceVersion']

    async def create(self, resource: str, ns: str | None, obj: dict) -> dict:
        return await self.request('POST', api_path(resource, ns), obj)

    async def merge(self, resource: str, ns: str | None, name: str, patch: dict, sub: str | None = None) -> dict:
        return await self.request('PATCH', api_path(resource, ns, name, sub), patch, 'application/merge-patch+json')

    async def put(self, resource: str, ns: str | None, name: str, obj: dict, sub: str | None = None) -> dict:
        return await self.request('PUT', api_path(resource, ns, name, sub), obj)

    async def delete(self, resource: str, ns: str | None, name: str) -> dict | None:
        """DELETE; None when it was already gone."""
        try:
            return await self.request('DELETE', api_path(resource, ns, name))
        except ApiStatusError as e:
            if e.code == 404:
                return None
            raise

    async def watch(self, resource: str, rv: str) -> AsyncIterator[dict]:
        assert self.session is not None
        params = {'watch': 'true', 'resourceVersion': rv, 'allowWatchBookmarks': 'false'}
        async with self.session.get(self.url + api_path(resource), params=params,
                                    timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as resp:
            if resp.status != 200:
                raise ApiStatusError(resp.status, await resp.text())
            buf = b''
            async for chunk in resp.content.iter_any():
                buf += chunk
                while b'\n' in buf:
                    line, buf = buf.split(b'\n', 1)
                    if line.strip():
                        yield json.loads(line)


def obj_key(obj: dict) -> tuple[str | None, str]:
    return obj['metadata'].get('namespace'), obj['metadata']['name']


class Informer:
    """LIST + WATCH of one resource into `cache`, calling `handler(type, obj, old)` in the loop.
    A watch that ends is resumed from the last resourceVersion; an error relists."""

    def __init__(self, api: Api, resource: str, handler: Callable[[str, dict, dict | None], Any] | None = None):
        self.api, self.resource, self.handler = api, resource, handler
        self.cache: dict[tuple[str | None, str], dict] = {}
        self.synced = asyncio.Event()

    def _emit(self, kind: str, obj: dict, old: dict | None) -> None:
        if self.handler is None:
            return
        try:
            self.handler(kind, obj, old)
        except Exception:  # a handler bug must not stop the informer
            log.exception('%s handler failed on %s %s', self.resource, kind, obj_key(obj))

    async def run(self) -> None:
        while True:
            try:
                items, rv = await self.api.list(self.resource)
                fresh = {obj_key(o): o for o in items}
                for key in list(self.cache):
                    if key not in fresh:
                        self._emit('DELETED', self.cache.pop(key), None)
                for key, obj in fresh.items():
                    old = self.cache.get(key)
                    self.cache[key] = obj
                    if old is None or old['metadata'].get('resourceVersion') != obj['metadata'].get('resourceVersion'):
                        self._emit('ADDED' if old is None else 'MODIFIED', obj, old)
                self.synced.set()
                while True:
                    async for event in self.api.watch(self.resource, rv):
                        kind, obj = event.get('type'), event.get('object') or {}
                        if kind == 'ERROR':
                            raise ApiStatusError(obj.get('code', 500), obj)
                        if kind == 'BOOKMARK':
                            rv = obj['metadata']['resourceVersion']
                            continue
                        rv = obj['metadata'].get('resourceVersion', rv)
                        key = obj_key(obj)
                        old = self.cache.get(key)
                        if kind == 'DELETED':
                            self.cache.pop(key, None)
                        else:
                            self.cache[key] = obj
                        self._emit(kind, obj, old)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # server restarting or gone: relist shortly
                log.debug('informer %s: %r; relisting', self.resource, e)
                await asyncio.sleep(0.1)


class LoopThread:
    """An asyncio loop in a daemon thread; subclasses implement `_astart` / `_astop`."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._tasks: list[asyncio.Task] = []
        self.started = False

    def call(self, fn: Any, *args: Any, timeout: float | None = 30) -> Any:
        """Run fn(*args) (sync or async) in the loop, from another thread; return its result."""
        async def run() -> Any:
            result = fn(*args)
            return await result if inspect.isawaitable(result) else result
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def spawn(self, coro: Any) -> asyncio.Task:
        task = self.loop.create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)
        return task

    async def cancel_spawned(self) -> None:
        """Cancel the tasks started with `spawn` (informers, workers) and wait for them."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def start(self) -> Any:
        self._thread.start()
        self.call(self._astart)
        self.started = True
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            self.call(self._astop, timeout=120)
        finally:
            async def cancel_all() -> None:
                tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            try:
                self.call(cancel_all, timeout=30)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(10)
                if not self._thread.is_alive():
                    self.loop.close()

    async def _astart(self) -> None:
        raise NotImplementedError

    async def _astop(self) -> None:
        pass


class WorkQueue:
    """client-go's workqueue semantics: a key is queued at most once, and a key being
    processed that is added again is processed once more afterwards."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        self._dirty: set = set()
        self._processing: set = set()

    def add(self, key: Any) -> None:
        if key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._processing:
            self._queue.put_nowait(key)

    def add_after(self, key: Any, delay: float) -> None:
        asyncio.get_running_loop().call_later(max(0.0, delay), self.add, key)

    async def get(self) -> Any:
        key = await self._queue.get()
        self._dirty.discard(key)
        self._processing.add(key)
        return key

    def done(self, key: Any) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._queue.put_nowait(key)


def controller_of(obj: dict) -> dict | None:
    return next((r for r in obj['metadata'].get('ownerReferences') or [] if r.get('controller')), None)


def label_selector_string(labels: dict[str, str]) -> str:
    return ','.join(f'{k}={v}' for k, v in sorted(labels.items()))


# ======================================================================================= job helpers

def default_job(job: dict) -> dict:
    """SetDefaults_PyTorchJob, on a copy (upstream defaults in memory and never writes spec)."""
    job = copy.deepcopy(job)
    spec = job.setdefault('spec', {})
    rp = spec.get('runPolicy')
    if rp is None:
        rp = spec['runPolicy'] = {}
    if rp.get('cleanPodPolicy') is None:
        rp['cleanPodPolicy'] = 'None'
    specs = spec.get('pytorchReplicaSpecs') or {}
    spec['pytorchReplicaSpecs'] = specs
    for typ in ('Master', 'Worker'):  # setPyTorchTypeNamesToCamelCase
        for t in list(specs):
            if t.lower() == typ.lower() and t != typ:
                specs[typ] = specs.pop(t)
                break
    for rs in specs.values():
        if rs is None:
            continue
        if rs.get('replicas') is None:
            rs['replicas'] = 1
        if not rs.get('restartPolicy'):
            rs['restartPolicy'] = 'OnFailure'
        containers = (((rs.get('template') or {}).get('spec') or {}).get('containers')) or []
        if containers:  # setPyTorchDefaultPort: the `pytorch` container, or the first one
            c = next((c for c in containers if c.get('name') == DEFAULT_CONTAINER), containers[0])
            ports = c.get('ports')
            if ports is None:
                ports = c['ports'] = []
            if not any(p.get('name') == DEFAULT_PORT_NAME for p in ports):
                ports.append({'name': DEFAULT_PORT_NAME, 'containerPort': DEFAULT_PORT})
    ep = spec.get('elasticPolicy')
    if ep is not None:  # setElasticPolicy
        if ep.get('maxReplicas') is not None and ep.get('minReplicas') is not None:
            pass
        elif ep.get('maxReplicas') is not None:
            ep['minReplicas'] = ep['maxReplicas']
        elif ep.get('minReplicas') is not None:
            ep['maxReplicas'] = ep['minReplicas']
        elif specs.get('Worker') is not None:
            ep['minReplicas'] = ep['maxReplicas'] = specs['Worker']['replicas']
    if (ep is not None and ep.get('nProcPerNode') is None) or ep is None:  # setDefaultNprocPerNode
        if spec.get('nprocPerNode') is None:
            spec['nprocPerNode'] = 'auto'
    return job


_DNS1035 = re.compile(r'[a-z]([-a-z0-9]*[a-z0-9])?')


def validate_job(job: dict, old: dict | None = None) -> list[str]:
    """validatePyTorchJob (the validating webhook), on the object as submitted."""
    errs = []
    name = job['metadata'].get('name', '')
    if len(name) > 63 or not _DNS1035.fullmatch(name):
        errs.append(f'metadata.name: Invalid value: {name!r}: a DNS-1035 label is required')
    spec = job.get('spec') or {}
    rp = spec.get('runPolicy') or {}
    if rp.get('managedBy') is not None and rp['managedBy'] not in SUPPORTED_MANAGERS:
        errs.append(f'spec.runPolicy.managedBy: Unsupported value: {rp["managedBy"]!r}')
    if old is not None and ((old.get('spec') or {}).get('runPolicy') or {}).get('managedBy') != rp.get('managedBy'):
        errs.append('spec.runPolicy.managedBy: Invalid value: field is immutable')
    specs = spec.get('pytorchReplicaSpecs')
    ep = spec.get('elasticPolicy')
    if ep is not None:
        if 'Worker' not in (specs or {}):
            errs.append('spec.pytorchReplicaSpecs[Worker]: Required value: must be configured if elastic policy is used')
        if ep.get('nProcPerNode') is not None and spec.get('nprocPerNode') is not None:
            errs.append('spec.elasticPolicy.nProcPerNode: Forbidden: must not be used with spec.nprocPerNode')
    if specs is None:
        errs.append('spec.pytorchReplicaSpecs: Required value: must be required')
    for rtype, rs in (specs or {}).items():
        path = f'spec.pytorchReplicaSpecs[{rtype}]'
        if rtype not in ('Master', 'Worker'):
            errs.append(f'{path}: Unsupported value: {rtype!r}')
        containers = (((rs or {}).get('template') or {}).get('spec') or {}).get('containers') or []
        if not containers:
            errs.append(f'{path}.template.spec.containers: Required value: must be specified')
        for i, c in enumerate(containers):
            if not c.get('image'):
                errs.append(f'{path}.template.spec.containers[{i}].image: Required value: must be required')
        if not any(c.get('name') == DEFAULT_CONTAINER for c in containers):
            errs.append(f'{path}.template.spec.containers: Required value: must have at least one container '
                        f'with name {DEFAULT_CONTAINER}')
        replicas = (rs or {}).get('replicas')
        if rtype == 'Master':
            if replicas is None or int(replicas) != 1:
                errs.append(f'{path}.replicas: Forbidden: must be 1')
        elif replicas is not None and int(replicas) < 1:
            errs.append(f'{path}.replicas: Forbidden: must be at least 1')
    return errs


def gen_labels(job_name: str) -> dict[str, str]:
    return {LABEL_OPERATOR: CONTROLLER_NAME, LABEL_JOB: job_name.replace('/', '-')}


def replica_name(job_name: str, rt: str, index: int | str) -> str:
    return f'{job_name}-{rt.lower()}-{index}'.replace('/', '-')


def _port_of(job: dict, rtype: str) -> int:
    """getPortFromPyTorchJob: the `pytorchjob-port` of the replica's `pytorch` container."""
    for c in job['spec']['pytorchReplicaSpecs'][rtype]['template']['spec'].get('containers') or []:
        if c.get('name') == DEFAULT_CONTAINER:
            for p in c.get('ports') or []:
                if p.get('name') == DEFAULT_PORT_NAME:
                    return int(p['containerPort'])
    raise ValueError('port not found')


def _nproc_int(job: dict) -> int:
    try:
        return int(job['spec'].get('nprocPerNode'))
    except (TypeError, ValueError):
        return 1


def pod_env(job: dict, rt: str, index: int) -> list[dict]:
    """What setPodEnv appends to every container's env (job already defaulted)."""
    spec = job['spec']
    specs = spec['pytorchReplicaSpecs']
    env = [{'name': 'PYTHONUNBUFFERED', 'value': '1'}]
    total = sum(int(r['replicas']) for r in specs.values())
    world = total * _nproc_int(job)
    if specs.get('Master') is not None:
        port, addr = str(_port_of(job, 'Master')), replica_name(job['metadata']['name'], 'Master', 0)
        env += [{'name': 'MASTER_PORT', 'value': port}, {'name': 'PET_MASTER_PORT', 'value': port},
                {'name': 'MASTER_ADDR', 'value': addr}, {'name': 'PET_MASTER_ADDR', 'value': addr}]
        rank = index + 1 if rt == 'worker' else index
        env += [{'name': 'WORLD_SIZE', 'value': str(world)}, {'name': 'RANK', 'value': str(rank)},
                {'name': 'PET_NODE_RANK', 'value': str(rank)}]
    if spec.get('nprocPerNode') is not None:
        env.append({'name': 'PET_NPROC_PER_NODE', 'value': spec['nprocPerNode']})
    ep = spec.get('elasticPolicy')
    if ep is not None:
        host = ep.get('rdzvHost') if ep.get('rdzvHost') is not None else f'{job["metadata"]["name"]}-worker-0'
        port = ep['rdzvPort'] if ep.get('rdzvPort') is not None else _port_of(job, 'Worker')
        env.append({'name': 'PET_RDZV_ENDPOINT', 'value': f'{host}:{port}'})
        env.append({'name': 'PET_RDZV_BACKEND', 'value': ep.get('rdzvBackend') or 'c10d'})
        if ep.get('minReplicas') is None and ep.get('maxReplicas') is None:
            env.append({'name': 'PET_NNODES', 'value': str(specs['Worker']['replicas'])})
        else:
            env.append({'name': 'PET_NNODES', 'value': f'{ep.get("minReplicas")}:{ep.get("maxReplicas")}'})
        if ep.get('maxRestarts') is not None:
            env.append({'name': 'PET_MAX_RESTARTS', 'value': str(int(ep['maxRestarts']))})
        if ep.get('nProcPerNode') is not None:
            env.append({'name': 'PET_NPROC_PER_NODE', 'value': str(int(ep['nProcPerNode']))})
        if ep.get('rdzvId') is not None:
            env.append({'name': 'PET_RDZV_ID', 'value': ep['rdzvId']})
        if ep.get('rdzvConf') is not None and len(ep['rdzvConf']):
            env.append({'name': 'PET_RDZV_CONF',
                        'value': ','.join(f'{c.get("key", "")}={c.get("value", "")}' for c in ep['rdzvConf'])})
        if ep.get('standalone'):
            env.append({'name': 'PET_STANDALONE', 'value': ''})
    else:
        env.append({'name': 'PET_NNODES', 'value': str(total)})
    return env


# ---------------------------------------------------------------------------------------- conditions

def _cond(status: dict, ctype: str) -> dict | None:
    return next((c for c in status.get('conditions') or [] if c['type'] == ctype), None)


def is_true(status: dict, ctype: str) -> bool:
    c = _cond(status, ctype)
    return bool(c and c['status'] == 'True')


def is_finished(status: dict) -> bool:
    return is_true(status, 'Succeeded') or is_true(status, 'Failed')


def update_condition(status: dict, ctype: str, cstatus: str, reason: str, message: str) -> None:
    """UpdateJobConditions -> setCondition -> filterOutCondition."""
    if is_true(status, 'Failed'):
        return
    now = now_iso()
    new = {'type': ctype, 'status': cstatus, 'reason': reason, 'message': message,
           'lastUpdateTime': now, 'lastTransitionTime': now}
    current = _cond(status, ctype)
    if current is not None and current['status'] == cstatus and current.get('reason') == reason:
        return
    if current is not None and current['status'] == cstatus:
        new['lastTransitionTime'] = current.get('lastTransitionTime', now)
    kept = []
    for c in status.get('conditions') or []:
        if (ctype == 'Restarting' and c['type'] == 'Running') or (ctype == 'Running' and c['type'] == 'Restarting'):
            continue
        if c['type'] == ctype:
            continue
        if ctype in ('Failed', 'Succeeded') and c['type'] == 'Running':
            c = {**c, 'status': 'False'}
        kept.append(c)
    status['conditions'] = kept + [new]


def normalized_status(status: dict) -> dict:
    """The JSON Go would write (omitempty)."""
    out = {k: v for k, v in status.items() if v not in (None, [], {})}
    if 'replicaStatuses' in status:
        out['replicaStatuses'] = {rt: {k: v for k, v in (rs or {}).items() if v not in (0, None, '')}
                                  for rt, rs in (status.get('replicaStatuses') or {}).items()}
        if not out['replicaStatuses']:
            del out['replicaStatuses']
    return out


# ======================================================================================= the controller

class PyTorchJobController(LoopThread):
    """Run with `.start()` / `.stop()` (or as a context manager); see the module docstring."""

    def __init__(self, url: str, *, resync_period: float | None = None,
                 init_container_image: str = 'alpine:3.10', init_container_max_tries: int = 100):
        super().__init__('pytorchjob-controller')
        self.url = url
        self.resync_period = resync_period
        self.init_container_image = init_container_image
        self.init_container_max_tries = init_container_max_tries
        self.rejected: dict[tuple[str, str], list[str]] = {}  # jobs the webhook would have refused
        self.errors: list[str] = []  # reconcile errors seen (requeued)
        self.reconciles = 0
        self._created_seen: set[str] = set()  # uids whose create event this controller observed
        self._failures: dict[tuple, int] = {}

    def __enter__(self) -> PyTorchJobController:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    async def _astart(self) -> None:
        self.api = Api(self.url, 'training-operator-emulated/v1.9.0')
        await self.api.open()
        self.queue = WorkQueue()
        self.jobs = Informer(self.api, JOBS, self._on_job)
        self.pods = Informer(self.api, PODS, self._on_dependent)
        self.services = Informer(self.api, SERVICES, self._on_dependent)
        for inf in (self.jobs, self.pods, self.services):
            self.spawn(inf.run())
        await asyncio.wait_for(asyncio.gather(*(i.synced.wait() for i in (self.jobs, self.pods, self.services))), 10)
        self.spawn(self._worker())
        if self.resync_period:
            self.spawn(self._resync())

    async def _astop(self) -> None:
        await self.cancel_spawned()
        await self.api.close()

    # ------------------------------------------------------------------------- event handlers
    def _on_job(self, kind: str, obj: dict, old: dict | None) -> None:
        if kind == 'DELETED':
            return
        self.queue.add(obj_key(obj))

    def _on_dependent(self, kind: str, obj: dict, old: dict | None) -> None:
        ref = controller_of(obj)
        if not ref or ref.get('kind') != KIND:
            return
        key = (obj['metadata'].get('namespace'), ref['name'])
        job = self.jobs.cache.get(key)
        if job is None or job['metadata'].get('uid') != ref.get('uid'):
            return
        self.queue.add(key)

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.resync_period)
            for key in list(self.jobs.cache):
                self.queue.add(key)

    async def _worker(self) -> None:
        while True:
            key = await self.queue.get()
            try:
                requeue_after = await self.reconcile(*key)
                self._failures.pop(key, None)
                if requeue_after is not None:
                    self.queue.add_after(key, requeue_after)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # controller-runtime: rate-limited requeue
                n = self._failures[key] = self._failures.get(key, 0) + 1
                if not (isinstance(e, ApiStatusError) and e.code == 409):
                    log.warning('reconcile %s/%s failed: %r', *key, e)
                    self.errors.append(f'{key}: {e!r}')
                self.queue.add_after(key, min(0.005 * 2 ** n, 2.0))
            finally:
                self.queue.done(key)

    # ------------------------------------------------------------------------- Reconcile
    async def reconcile(self, ns: str, name: str) -> float | None:
        self.reconciles += 1
        raw = await self.api.get(JOBS, ns, name)
        if raw is None:
            return None
        meta = raw['metadata']
        rp_raw = (raw.get('spec') or {}).get('runPolicy') or {}
        if rp_raw.get('managedBy') not in (None, KUBEFLOW_CONTROLLER):
            return None
        errs = validate_job(raw)
        if errs:
            if self.rejected.get((ns, name)) != errs:
                log.warning('PyTorchJob %s/%s would be rejected by the webhook: %s', ns, name, errs)
            self.rejected[(ns, name)] = errs
            return None
        self.rejected.pop((ns, name), None)
        if meta.get('deletionTimestamp'):
            return None
        job = default_job(raw)
        status = copy.deepcopy(raw.get('status') or {})
        if meta['uid'] not in self._created_seen:  # onOwnerCreateFunc, on the (cached) object
            self._created_seen.add(meta['uid'])
            update_condition(status, 'Created', 'True', f'{KIND}Created', f'{KIND} {name} is created.')
        await self.reconcile_jobs(job, raw, status)
        return self._until_expire(job, status)

    def _until_expire(self, job: dict, status: dict) -> float | None:
        """DurationUntilExpireTime -> ctrl.Result{RequeueAfter}."""
        ttl = job['spec']['runPolicy'].get('ttlSecondsAfterFinished')
        if not is_finished(status) or ttl is None:
            return None
        done = parse_time(status.get('completionTime'))
        if done is None:
            raise ValueError('job completion time is nil, cannot cleanup')
        left = (done + datetime.timedelta(seconds=int(ttl)) - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
        return max(0.0, left) + 0.01

    async def _write_status(self, raw: dict, status: dict) -> None:
        """UpdateJobStatusInApiServer: an update of /status with the object as read."""
        status = normalized_status({**status, 'replicaStatuses': status.get('replicaStatuses') or {}})
        body = {k: v for k, v in raw.items() if k != 'status'}
        body['status'] = status
        await self.api.put(JOBS, raw['metadata']['namespace'], raw['metadata']['name'], body, sub='status')

    async def _pods_for(self, job: dict) -> list[dict]:
        items, _ = await self.api.list(PODS, job['metadata']['namespace'], gen_labels(job['metadata']['name']))
        uid = job['metadata']['uid']
        return [p for p in items if (controller_of(p) or {}).get('uid') == uid]

    async def _services_for(self, job: dict) -> list[dict]:
        items, _ = await self.api.list(SERVICES, job['metadata']['namespace'], gen_labels(job['metadata']['name']))
        return items

    @staticmethod
    def _replica_types(job: dict) -> list[str]:
        specs = job['spec']['pytorchReplicaSpecs']
        return [t for t in ('Master', 'Worker') if t in specs] + sorted(t for t in specs if t not in ('Master', 'Worker'))

    async def reconcile_jobs(self, job: dict, raw: dict, status: dict) -> None:
        """common.ReconcileJobs."""
        name, ns = job['metadata']['name'], job['metadata']['namespace']
        specs = job['spec']['pytorchReplicaSpecs']
        rp = job['spec']['runPolicy']
        pods = await self._pods_for(job)
        services = await self._services_for(job)
        old = normalized_status(copy.deepcopy(status))
        orig = normalized_status(copy.deepcopy(raw.get('status') or {}))

        async def write_if_changed() -> None:
            new = normalized_status(status)
            if new != old or new != orig:
                await self._write_status(raw, status)

        if is_finished(status):
            await self._clean_up(job, status, pods)
            if is_true(status, 'Succeeded'):
                for rs in (status.get('replicaStatuses') or {}).values():
                    rs['succeeded'] = rs.get('succeeded', 0) + rs.get('active', 0)
                    rs['active'] = 0
            await write_if_changed()
            return
        if rp.get('suspend'):
            await self._clean_up(job, status, pods)
            for rs in (status.get('replicaStatuses') or {}).values():
                rs['active'] = 0
            msg = f'{KIND} {name} is suspended.'
            if is_true(status, 'Running'):
                update_condition(status, 'Running', 'False', f'{KIND}Suspended', msg)
            if not is_true(status, 'Suspended'):
                update_condition(status, 'Suspended', 'True', f'{KIND}Suspended', msg)
            await write_if_changed()
            return
        if is_true(status, 'Suspended'):
            update_condition(status, 'Suspended', 'False', f'{KIND}Resumed', f'{KIND} {name} is resumed.')
            status['startTime'] = now_iso()

        previous_retry = 0  # FakeWorkQueue.NumRequeues
        active = sum(1 for p in pods if _pod_active(p))
        failed = sum(1 for p in pods if _phase(p) == 'Failed')
        total = sum(int(r['replicas']) if r.get('replicas') is not None else 1 for r in specs.values())
        prev_failed = sum((rs or {}).get('failed', 0) for rs in (status.get('replicaStatuses') or {}).values())
        exceeds = past = False
        if rp.get('backoffLimit') is not None:
            limit = int(rp['backoffLimit'])
            exceeds = failed > prev_failed and active != total and previous_retry + 1 > limit
            past = past_backoff_limit(limit, specs, pods)
        failure = ''
        if exceeds or past:
            failure = f'Job {name} has failed because it has reached the specified backoff limit'
        elif past_active_deadline(rp, status):
            failure = f'Job {name} has failed because it was active longer than specified deadline'
        if failure:
            if not status.get('completionTime'):
                status['completionTime'] = now_iso()
            await self._delete_pods_and_services(job, status, pods)
            await self._cleanup_job(job, status)
            update_condition(status, 'Failed', 'True', f'{KIND}Failed', failure)
            await self._write_status(raw, status)
            return
        for rtype in self._replica_types(job):
            await self.reconcile_pods(job, status, pods, rtype, specs[rtype])
            await self.reconcile_services(job, services, rtype, specs[rtype])
        self.update_job_status(job, status)
        await write_if_changed()

    async def _clean_up(self, job: dict, status: dict, pods: list[dict]) -> None:
        await self._delete_pods_and_services(job, status, pods)
        await self._cleanup_job(job, status)

    async def _cleanup_job(self, job: dict, status: dict) -> None:
        """CleanupJob: TTL deletion is done by `reconcile` through RequeueAfter + this check."""
        ttl = job['spec']['runPolicy'].get('ttlSecondsAfterFinished')
        if ttl is None or job['spec']['runPolicy'].get('suspend'):
            return
        done = parse_time(status.get('completionTime'))
        if done is None:
            raise ValueError('job completion time is nil, cannot cleanup')
        if datetime.datetime.now(datetime.timezone.utc) > done + datetime.timedelta(seconds=int(ttl)):
            await self.api.delete(JOBS, job['metadata']['namespace'], job['metadata']['name'])

    async def _delete_pods_and_services(self, job: dict, status: dict, pods: list[dict]) -> None:
        policy = job['spec']['runPolicy']['cleanPodPolicy']
        if not pods:
            return
        if is_finished(status) and policy == 'None':
            return
        ns = job['metadata']['namespace']
        for pod in pods:
            if is_finished(status) and policy == 'Running' and _phase(pod) not in ('Running', 'Pending'):
                continue
            await self._delete_pod(ns, pod['metadata']['name'])
            await self._delete_service(ns, pod['metadata']['name'])

    async def _delete_pod(self, ns: str, name: str) -> None:
        pod = await self.api.get(PODS, ns, name)
        if pod is None or pod['metadata'].get('deletionTimestamp'):
            return
        await self.api.delete(PODS, ns, name)

    async def _delete_service(self, ns: str, name: str) -> None:
        svc = await self.api.get(SERVICES, ns, name)
        if svc is None or svc['metadata'].get('deletionTimestamp'):
            return
        await self.api.delete(SERVICES, ns, name)

    # ------------------------------------------------------------------------- ReconcilePods
    async def reconcile_pods(self, job: dict, status: dict, pods: list[dict], rtype: str, spec: dict) -> None:
        rt = rtype.lower()
        name, ns = job['metadata']['name'], job['metadata']['namespace']
        pods = [p for p in pods if (p['metadata'].get('labels') or {}).get(LABEL_TYPE) == rt]
        num = int(spec['replicas'])
        status.setdefault('replicaStatuses', {})[rtype] = {}  # initializeReplicaStatuses
        slices = _slices(pods, num)
        for index, slice_ in enumerate(slices):
            if len(slice_) > 1:
                log.warning('We have too many pods for %s %d', rt, index)
            elif not slice_:
                await self._create_pod(job, rtype, index, spec)
            else:
                pod = slice_[0]
                if index >= num:
                    await self._delete_pod(ns, pod['metadata']['name'])
                exit_code = 0xbeef
                for cs in (pod.get('status') or {}).get('containerStatuses') or []:
                    term = (cs.get('state') or {}).get('terminated')
                    if cs.get('name') == DEFAULT_CONTAINER and term is not None:
                        exit_code = int(term.get('exitCode', 0))
                if _phase(pod) == 'Failed':
                    policy = spec['restartPolicy']
                    if (policy == 'ExitCode' and exit_code >= 128) or policy in ('OnFailure', 'Always'):
                        await self._delete_pod(ns, pod['metadata']['name'])
                        update_condition(status, 'Restarting', 'True', f'{KIND}Restarting',
                                         f'job {name} is restarting because {rtype} replica(s) failed.')
                    elif policy == 'ExitCode':
                        update_condition(status, 'Failed', 'True', f'{KIND}Failed',
                                         f'job "{name}" is failing because "{rtype}" replica(s) failed.')
                _update_replica_status(status, rtype, pod)

    async def _create_pod(self, job: dict, rtype: str, index: int, spec: dict) -> None:
        """createNewPod + GetPodFromTemplate."""
        rt = rtype.lower()
        name, ns = job['metadata']['name'], job['metadata']['namespace']
        specs = job['spec']['pytorchReplicaSpecs']
        labels = gen_labels(name)
        labels[LABEL_TYPE] = rt
        labels[LABEL_INDEX] = str(index)
        master_role = rtype == 'Master' if 'Master' in specs else (rtype == 'Worker' and index == 0)
        if master_role:
            labels[LABEL_ROLE] = 'master'
        template = copy.deepcopy(spec.get('template') or {})
        tmeta = template.get('metadata') or {}
        pod_spec = template.get('spec') or {}
        pod_labels = {**(tmeta.get('labels') or {}), **labels}
        env = pod_env(job, rt, index)
        for c in pod_spec.get('containers') or []:
            c['env'] = list(c.get('env') or []) + copy.deepcopy(env)
        if 'Master' in specs and rt == 'worker':  # setInitContainer
            addr = replica_name(name, 'Master', 0)
            pod_spec['initContainers'] = list(pod_spec.get('initContainers') or []) + [{
                'name': 'init-pytorch', 'image': self.init_container_image, 'imagePullPolicy': 'IfNotPresent',
                'resources': {'limits': {'cpu': '100m', 'memory': '20Mi'}, 'requests': {'cpu': '50m', 'memory': '10Mi'}},
                'command': ['sh', '-c', INIT_CONTAINER_TEMPLATE.format(tries=self.init_container_max_tries, addr=addr)]}]
        policy = spec['restartPolicy']
        pod_spec['restartPolicy'] = 'Never' if policy == 'ExitCode' else policy  # SetRestartPolicy
        meta = {'name': replica_name(name, rt, index), 'labels': pod_labels,
                'ownerReferences': [self._owner_ref(job)]}
        if tmeta.get('annotations'):
            meta['annotations'] = tmeta['annotations']
        if tmeta.get('finalizers'):
            meta['finalizers'] = tmeta['finalizers']
        pod = {'apiVersion': 'v1', 'kind': 'Pod', 'metadata': meta, 'spec': pod_spec}
        await self.api.create(PODS, ns, pod)  # a 409 (our read missed it) requeues, as upstream

    @staticmethod
    def _owner_ref(job: dict) -> dict:
        return {'apiVersion': 'kubeflow.org/v1', 'kind': KIND, 'name': job['metadata']['name'],
                'uid': job['metadata']['uid'], 'blockOwnerDeletion': True, 'controller': True}

    # ------------------------------------------------------------------------- ReconcileServices
    async def reconcile_services(self, job: dict, services: list[dict], rtype: str, spec: dict) -> None:
        rt = rtype.lower()
        ns = job['metadata']['namespace']
        services = [s for s in services if (s['metadata'].get('labels') or {}).get(LABEL_TYPE) == rt]
        num = int(spec['replicas'])
        for index, slice_ in enumerate(_slices(services, num)):
            if len(slice_) > 1:
                log.warning('We have too many services for %s %d', rtype, index)
            elif not slice_:
                await self._create_service(job, rtype, spec, index)
            elif index >= num:
                await self._delete_service(ns, slice_[0]['metadata']['name'])

    async def _create_service(self, job: dict, rtype: str, spec: dict, index: int) -> None:
        rt = rtype.lower()
        labels = gen_labels(job['metadata']['name'])
        labels[LABEL_TYPE] = rt
        labels[LABEL_INDEX] = str(index)
        ports = None
        for c in spec['template']['spec'].get('containers') or []:  # GetPortsFromJob
            if c.get('name') == DEFAULT_CONTAINER:
                ports = {p.get('name', ''): int(p['containerPort']) for p in c.get('ports') or []} or None
                break
        else:
            raise ValueError('failed to find the port')
        svc_spec: dict[str, Any] = {'clusterIP': 'None', 'selector': dict(labels)}
        if ports:
            svc_spec['ports'] = [{'name': n, 'port': p} for n, p in sorted(ports.items())]
        svc = {'apiVersion': 'v1', 'kind': 'Service',
               'metadata': {'name': replica_name(job['metadata']['name'], rt, index), 'labels': labels,
                            'ownerReferences': [self._owner_ref(job)]},
               'spec': svc_spec}
        await self.api.create(SERVICES, job['metadata']['namespace'], svc)

    # ------------------------------------------------------------------------- UpdateJobStatus
    def update_job_status(self, job: dict, status: dict) -> None:
        name, ns = job['metadata']['name'], job['metadata']['namespace']
        specs = job['spec']['pytorchReplicaSpecs']
        if not status.get('startTime'):
            status['startTime'] = now_iso()
        for rtype in self._replica_types(job):
            spec = specs[rtype]
            rs = status['replicaStatuses'][rtype]
            rs['selector'] = label_selector_string({**gen_labels(name), LABEL_TYPE: rtype.lower()})
            succeeded, running, failed = rs.get('succeeded', 0), rs.get('active', 0), rs.get('failed', 0)
            replicas = int(spec['replicas'])
            expected = replicas - succeeded
            if 'Master' in specs:
                if rtype == 'Master':
                    if running > 0:
                        update_condition(status, 'Running', 'True', f'{KIND}Running', f'{KIND} {name} is running.')
                    if expected == 0:
                        if not status.get('completionTime'):
                            status['completionTime'] = now_iso()
                        update_condition(status, 'Succeeded', 'True', f'{KIND}Succeeded',
                                         f'{KIND} {name} is successfully completed.')
                        return
            elif rtype == 'Worker':
                if expected == 0 or (job['spec'].get('elasticPolicy') is not None and succeeded > 0):
                    if not status.get('completionTime'):
                        status['completionTime'] = now_iso()
                    update_condition(status, 'Succeeded', 'True', f'{KIND}Succeeded',
                                     f'{KIND} {ns}/{name} successfully completed.')
                elif running > 0:
                    update_condition(status, 'Running', 'True', f'{KIND}Running', f'{KIND} {ns}/{name} is running.')
            if failed > 0 and replicas > succeeded + running:
                if spec['restartPolicy'] != 'Never':
                    update_condition(status, 'Restarting', 'True', f'{KIND}Restarting',
                                     f'{KIND} {name} is restarting because {failed} {rtype} replica(s) failed.')
                else:
                    if not status.get('completionTime'):
                        status['completionTime'] = now_iso()
                    update_condition(status, 'Failed', 'True', f'{KIND}Failed',
                                     f'{KIND} {name} is failed because {failed} {rtype} replica(s) failed.')


def _phase(pod: dict) -> str | None:
    return (pod.get('status') or {}).get('phase')


def _pod_active(pod: dict) -> bool:
    """k8sutil.IsPodActive."""
    return _phase(pod) not in ('Succeeded', 'Failed') and not pod['metadata'].get('deletionTimestamp')


def _index(obj: dict) -> int | None:
    try:
        return int((obj['metadata'].get('labels') or {})[LABEL_INDEX])
    except (KeyError, ValueError):
        return None


def _slices(objs: list[dict], replicas: int) -> list[list[dict]]:
    """GetPodSlices / GetServiceSlices."""
    indexes = [i for i in (_index(o) for o in objs) if i is not None]
    size = max(max(indexes, default=0) + 1, replicas)
    out: list[list[dict]] = [[] for _ in range(size)]
    for o in sorted(objs, key=lambda o: o['metadata']['name']):
        i = _index(o)
        if i is not None and i >= 0:
            out[i].append(o)
    return out


def _update_replica_status(status: dict, rtype: str, pod: dict) -> None:
    rs = status['replicaStatuses'][rtype]
    phase = _phase(pod)
    if phase == 'Running':
        key = 'failed' if pod['metadata'].get('deletionTimestamp') else 'active'
    elif phase == 'Succeeded':
        key = 'succeeded'
    elif phase == 'Failed':
        key = 'failed'
    else:
        return
    rs[key] = rs.get(key, 0) + 1


def past_backoff_limit(limit: int, specs: dict, pods: list[dict]) -> bool:
    """core.PastBackoffLimit."""
    result = 0
    for rtype, spec in specs.items():
        if spec.get('restartPolicy') not in ('OnFailure', 'Always', 'ExitCode'):
            continue
        for pod in pods:
            if (pod['metadata'].get('labels') or {}).get(LABEL_TYPE) != rtype.lower() or _phase(pod) != 'Running':
                continue
            st = pod.get('status') or {}
            for cs in (st.get('initContainerStatuses') or []) + (st.get('containerStatuses') or []):
                result += int(cs.get('restartCount', 0))
    return result > 0 if limit == 0 else result >= limit


def past_active_deadline(rp: dict, status: dict) -> bool:
    """core.PastActiveDeadline."""
    deadline, start = rp.get('activeDeadlineSeconds'), parse_time(status.get('startTime'))
    if deadline is None or start is None:
        return False
    return (datetime.datetime.now(datetime.timezone.utc) - start).total_seconds() >= int(deadline)
