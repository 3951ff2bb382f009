"""A faithful cluster for tests: the HTTP emulator + the Kubeflow PyTorchJob controller
(tests/support/kubeflow_controller.py) + a kubelet that runs pods as real processes in their
own network/mount/UTS/PID namespaces, a Deployment controller and an ownerReference garbage
collector (tests/support/kubelet.py).

    from tests.support.faithful_cluster import faithful_cluster  # noqa: F401  (the fixture)

    def test_x(faithful_cluster):
        c = faithful_cluster
        c.create('v1/secrets', {'metadata': {'name': 's3'}, 'stringData': {'KEY': 'v'}})
        c.kubectl('apply', '--validate=false', '-f', str(manifest))  # the emulator serves no /openapi
        pod = c.wait_pod_phase('web-0', 'Running')
        ...
        c.kill_container('web-0')                        # SIGKILL its PID 1; restarts per policy
        msg = c.wait_terminated('web-0')['message']      # the termination message

Everything runs in background threads; a test waits on events with `wait_for` (no fixed
sleeps): every watch event of pods, PyTorchJobs, Services and Deployments re-evaluates the
predicate. Pods reach servers the test starts on `cluster.host_ip` (or 0.0.0.0), the
bridge's own address in the root namespace; 127.0.0.1 in a pod is the pod itself. The
operator under test runs in the test process and talks to `cluster.url` / `cluster.kubeconfig`.
Teardown (also on failure, and if a previous run was SIGKILLed: stale bridges and network
namespaces are removed by pid) stops the controllers, kills every container process and
deletes the pods' network namespaces and the bridge.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.kube_emulator import DEFAULT_RESOURCES, KubeServer, resource_info
from tests.support.kubeflow_controller import JOBS, Informer, LoopThread, Api, PyTorchJobController, api_path, obj_key
from tests.support.kubelet import (DEPLOYMENTS, PODS, SERVICES, DeploymentController, GarbageCollector, Kubelet,
                                   cleanup_stale_network)

log = logging.getLogger(__name__)

FAITHFUL_RESOURCES = {
    **DEFAULT_RESOURCES,
    'v1/secrets': resource_info('Secret'),
    'policy/v1/poddisruptionbudgets': resource_info('PodDisruptionBudget', subresources={'status'}),
}

_WATCHED = (PODS, JOBS, SERVICES, DEPLOYMENTS)


class _Watcher(LoopThread):
    """Snapshots of the watched resources, and a condition notified at every event."""

    def __init__(self, url: str):
        super().__init__('faithful-watcher')
        self.url = url
        self.cond = threading.Condition()
        self.objects: dict[str, dict[tuple, dict]] = {r: {} for r in _WATCHED}
        self.history: dict[str, list[tuple[str, dict]]] = {r: [] for r in _WATCHED}

    async def _astart(self) -> None:
        self.api = Api(self.url, 'faithful-test-watcher')
        await self.api.open()
        infs = [Informer(self.api, res, self._handler(res)) for res in _WATCHED]
        for inf in infs:
            self.spawn(inf.run())
        for inf in infs:
            await inf.synced.wait()

    async def _astop(self) -> None:
        await self.cancel_spawned()
        await self.api.close()

    def _handler(self, res: str) -> Callable:
        def on(kind: str, obj: dict, old: dict | None) -> None:
            with self.cond:
                self.history[res].append((kind, obj))
                if kind == 'DELETED':
                    self.objects[res].pop(obj_key(obj), None)
                else:
                    self.objects[res][obj_key(obj)] = obj
                self.cond.notify_all()
        return on

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str,
             describe: Callable[[], str] = lambda: '') -> Any:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                try:
                    result = predicate()
                except (KeyError, IndexError):  # a field not there yet
                    result = None
                if result:
                    return result
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f'timed out after {timeout}s waiting for {what}; last: {result!r}\n{describe()}')
                self.cond.wait(min(left, 1.0))  # 1 s: predicates that depend on time too


class FaithfulCluster:
    """See the module docstring. Use as a context manager (or the `faithful_cluster` fixture)."""

    def __init__(self, workdir: str | Path, *, resources: dict | None = None, namespace: str = 'default',
                 resync_period: float | None = None, kubelet_options: dict | None = None):
        self.workdir = Path(workdir)
        self.resources = dict(resources or FAITHFUL_RESOURCES)
        self.namespace = namespace
        self.resync_period = resync_period
        self.kubelet_options = dict(kubelet_options or {})
        self._stack = contextlib.ExitStack()

    # ------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> FaithfulCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            cleanup_stale_network()
            self.kube = KubeServer(self.resources)
            self._stack.enter_context(self.kube)
            self.url = self.kube.url
            self.kubeconfig = self.kube.write_kubeconfig(self.workdir / 'kubeconfig', self.namespace)
            self.kubelet = Kubelet(self.url, self.workdir / 'node', **self.kubelet_options)
            self._stack.callback(self.kubelet.net.teardown)  # runs last, even if stop() failed
            self._stack.callback(self.kubelet.stop)
            self.kubelet.start()
            self.host_ip = self.kubelet.host_ip
            self.controller = PyTorchJobController(self.url, resync_period=self.resync_period)
            self._stack.callback(self.controller.stop)
            self.controller.start()
            self.gc = GarbageCollector(self.url, self.resources)
            self._stack.callback(self.gc.stop)
            self.gc.start()
            self.deployments = DeploymentController(self.url)
            self._stack.callback(self.deployments.stop)
            self.deployments.start()
            self.watcher = _Watcher(self.url)
            self._stack.callback(self.watcher.stop)
            self.watcher.start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    # ------------------------------------------------------------------------- API over HTTP
    def request(self, method: str, path: str, body: Any = None, content_type: str = 'application/json') -> tuple[int, Any]:
        return self.kube.request(method, path, body, content_type)

    def create(self, resource: str, obj: dict, ns: str | None = None) -> dict:
        """POST an object ('v1/pods', 'kubeflow.org/v1/pytorchjobs', ...) into `ns` (default: the
        object's namespace, else the cluster's)."""
        ns = ns or obj.get('metadata', {}).get('namespace') or self.namespace
        code, out = self.request('POST', api_path(resource, ns), obj)
        assert code in (200, 201), (code, out)
        return out

    def merge(self, resource: str, name: str, patch: dict, ns: str | None = None, sub: str | None = None) -> dict:
        code, out = self.request('PATCH', api_path(resource, ns or self.namespace, name, sub), patch,
                                 'application/merge-patch+json')
        assert code == 200, (code, out)
        return out

    def delete(self, resource: str, name: str, ns: str | None = None) -> None:
        code, out = self.request('DELETE', api_path(resource, ns or self.namespace, name))
        assert code in (200, 202, 404), (code, out)

    def get(self, resource: str, name: str, ns: str | None = None) -> dict | None:
        """The stored object now (live read, bypassing HTTP)."""
        return self.kube.get(resource, ns or self.namespace, name)

    def list(self, resource: str, ns: str | None = None, **labels: str) -> list[dict]:
        code, out = self.request('GET', api_path(resource, ns or self.namespace))
        assert code == 200, (code, out)
        return [o for o in out['items'] if all((o['metadata'].get('labels') or {}).get(k) == v for k, v in labels.items())]

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        env = {**os.environ, 'KUBECONFIG': str(self.kubeconfig)}
        res = subprocess.run(['kubectl', *args], input=input, capture_output=True, text=True, env=env, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f'kubectl {" ".join(args)} failed ({res.returncode}): {res.stderr}')
        return res

    # ------------------------------------------------------------------------- waiting (event-driven)
    def snapshot(self, resource: str, name: str, ns: str | None = None) -> dict | None:
        """The object as of the last watch event the test has seen (call inside predicates)."""
        return self.watcher.objects[resource].get((ns or self.namespace, name))

    def history(self, resource: str, name: str, ns: str | None = None) -> list[dict]:
        """Every version of the object the watch delivered, oldest first (DELETED included)."""
        key = (ns or self.namespace, name)
        with self.watcher.cond:
            return [o for _, o in self.watcher.history[resource] if obj_key(o) == key]

    def job_conditions_seen(self, name: str, ns: str | None = None) -> list[tuple[str, str, str]]:
        """(type, status, reason) of every condition state the job went through, in order."""
        seen: list[tuple[str, str, str]] = []
        for job in self.history(JOBS, name, ns):
            for c in (job.get('status') or {}).get('conditions') or []:
                item = (c['type'], c['status'], c.get('reason', ''))
                if item not in seen:
                    seen.append(item)
        return seen

    def snapshots(self, resource: str, ns: str | None = None, **labels: str) -> list[dict]:
        """The objects of a resource in ns with these labels, as of the last watch event."""
        ns = ns or self.namespace
        return [o for (ons, _), o in list(self.watcher.objects[resource].items())
                if ons == ns and all((o['metadata'].get('labels') or {}).get(k) == v for k, v in labels.items())]

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 20, what: str = '') -> Any:
        """Re-evaluate predicate at every watch event until it is truthy (a KeyError or IndexError
        counts as not yet); return its value."""
        return self.watcher.wait(predicate, timeout, what or getattr(predicate, '__name__', 'condition'), self.describe)

    def describe(self) -> str:
        """Pods (phase, containers' states) and PyTorchJobs (conditions) as the test sees them,
        and the controller's errors: printed when a wait times out."""
        lines = ['cluster state:']
        for (ns, name), pod in sorted(self.watcher.objects[PODS].items()):
            st = pod.get('status') or {}
            cs = ', '.join(f"{c['name']}:{next(iter(c.get('state') or {'?': 0}))}/restarts={c.get('restartCount')}"
                           for c in st.get('containerStatuses') or [])
            term = ' terminating' if pod['metadata'].get('deletionTimestamp') else ''
            lines.append(f'  pod {ns}/{name} {st.get("phase")}{term} ip={st.get("podIP")} [{cs}]')
        for (ns, name), job in sorted(self.watcher.objects[JOBS].items()):
            conds = [f"{c['type']}={c['status']}" for c in (job.get('status') or {}).get('conditions') or []]
            lines.append(f'  pytorchjob {ns}/{name} {" ".join(conds)}')
        if self.controller.errors:
            lines.append(f'  controller errors (last 5): {self.controller.errors[-5:]}')
        if self.controller.rejected:
            lines.append(f'  rejected jobs: {self.controller.rejected}')
        return '\n'.join(lines)

    def wait_pod_phase(self, name: str, phase: str, ns: str | None = None, timeout: float = 20) -> dict:
        def check() -> Any:
            pod = self.snapshot(PODS, name, ns)
            return pod if pod and (pod.get('status') or {}).get('phase') == phase else None
        return self.wait_for(check, timeout, f'pod {name} phase {phase}')

    def wait_pod_condition(self, name: str, ctype: str = 'Ready', status: str = 'True', ns: str | None = None,
                           timeout: float = 20) -> dict:
        def check() -> Any:
            pod = self.snapshot(PODS, name, ns)
            conds = ((pod or {}).get('status') or {}).get('conditions') or []
            return pod if any(c['type'] == ctype and c['status'] == status for c in conds) else None
        return self.wait_for(check, timeout, f'pod {name} condition {ctype}={status}')

    def wait_pod(self, name: str, predicate: Callable[[dict], Any], ns: str | None = None, timeout: float = 20,
                 what: str = '') -> Any:
        """Wait until the pod exists and predicate(pod) is truthy."""
        def check() -> Any:
            pod = self.snapshot(PODS, name, ns)
            return predicate(pod) if pod else None
        return self.wait_for(check, timeout, what or f'pod {name}')

    def wait_gone(self, resource: str, name: str, ns: str | None = None, timeout: float = 20) -> None:
        self.wait_for(lambda: self.snapshot(resource, name, ns) is None, timeout, f'{resource} {name} gone')

    def wait_pod_replaced(self, name: str, old_uid: str, ns: str | None = None, timeout: float = 20) -> dict:
        """A pod of that name with another uid (the controller recreated it)."""
        def check() -> Any:
            pod = self.snapshot(PODS, name, ns)
            return pod if pod and pod['metadata']['uid'] != old_uid else None
        return self.wait_for(check, timeout, f'pod {name} recreated')

    def wait_terminated(self, name: str, container: str | None = None, ns: str | None = None,
                        timeout: float = 20) -> dict:
        """The `state.terminated` (or, once restarted, `lastState.terminated`) of a container."""
        def check() -> Any:
            pod = self.snapshot(PODS, name, ns)
            for cs in ((pod or {}).get('status') or {}).get('containerStatuses') or []:
                if container in (None, cs['name']):
                    t = (cs.get('state') or {}).get('terminated') or (cs.get('lastState') or {}).get('terminated')
                    if t:
                        return t
            return None
        return self.wait_for(check, timeout, f'container {container or "*"} of {name} terminated')

    def job_condition(self, name: str, ctype: str, ns: str | None = None) -> dict | None:
        job = self.snapshot(JOBS, name, ns)
        return next((c for c in ((job or {}).get('status') or {}).get('conditions') or [] if c['type'] == ctype), None)

    def wait_job_condition(self, name: str, ctype: str, status: str = 'True', ns: str | None = None,
                           timeout: float = 20) -> dict:
        def check() -> Any:
            c = self.job_condition(name, ctype, ns)
            return c if c and c['status'] == status else None
        return self.wait_for(check, timeout, f'PyTorchJob {name} condition {ctype}={status}')

    # ------------------------------------------------------------------------- the node
    def kill_container(self, pod: str, sig: int = signal.SIGKILL, container: str | None = None,
                       ns: str | None = None) -> int:
        return self.kubelet.kill_container(pod, sig, container, ns or self.namespace)

    def lose_node(self, pod: str, ns: str | None = None) -> None:
        self.kubelet.lose_node(pod, ns or self.namespace)

    def evict(self, pod: str, ns: str | None = None) -> None:
        self.kubelet.evict(pod, ns or self.namespace)

    def logs(self, pod: str, container: str | None = None, ns: str | None = None, previous: bool = False) -> str:
        return self.kubelet.logs(pod, ns or self.namespace, container, previous)

    @property
    def termination_messages(self) -> list[dict]:
        """Every container exit so far: {pod, namespace, container, exitCode, message}."""
        return copy.deepcopy(self.kubelet.messages)


@pytest.fixture
def faithful_cluster(tmp_path: Path) -> Iterator[FaithfulCluster]:
    """A fresh faithful cluster (emulator, PyTorchJob controller, kubelet, GC, Deployments)."""
    with FaithfulCluster(tmp_path / 'cluster') as cluster:
        yield cluster
