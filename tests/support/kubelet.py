"""A kubelet that runs pods as real local processes, plus a tiny Deployment controller and an
ownerReference garbage collector, for the HTTP emulator (tests/support/kube_emulator.py).

Isolation, as on a node (root and Linux namespaces; see `Network` and `SHIM_SOURCE`):
- every pod has its own network namespace (`ip netns`), with `eth0` on a veth pair into a
  per-cluster bridge in a private 10.x.y.0/24 that is picked free of `ip route` and deleted
  with the cluster. The bridge's own address, `Network.host_ip` (x.y.z.1), is the root
  namespace as the pods see it: a server a test starts on that address (or 0.0.0.0) is
  reachable from every pod. 127.0.0.1 inside a pod is the pod itself. There is no
  forwarding or NAT to anywhere else. Stale bridges and namespaces of dead test processes
  (names carry the pid) are removed when a new one is set up.
- every container runs under a small shim (a containerd-shim stand-in, `SHIM_SOURCE`):
  it joins the pod's network namespace, unshares mount, UTS (hostname = the pod's hostname)
  and PID namespaces, bind-mounts the volumes at their mountPath, the pod's /etc/hosts,
  /etc/hostname, /etc/resolv.conf and the container's termination-message file, and forks
  the container's main process as PID 1 of its PID namespace. As in a container, PID 1
  ignores signals it has no handler for (except SIGKILL), and when it exits every other
  process of the container is killed by the kernel. Every container gets a private copy of
  /dev, and a mountPath that does not exist on the host is created in a private tmpfs copy
  of its parent directory ("shadow"), never on the host; otherwise the container sees the
  host's root filesystem (writes outside its volumes and /dev land on the host). Both
  processes die with the kubelet (PR_SET_PDEATHSIG), even if the test process is SIGKILLed.
- cluster DNS is each pod's /etc/hosts, rewritten in place (same inode) when pods or Services
  change: a Service `svc` in `ns` (with a selector, headless or not) resolves as `svc` (same
  namespace only), `svc.ns`, `svc.ns.svc` and `svc.ns.svc.cluster.local` to the IP of one
  ready endpoint pod (the oldest), `<hostname>.<subdomain>` (+ `.ns`, `.ns.svc`,
  `.ns.svc.cluster.local`) to a ready pod with that hostname whose subdomain names a Service
  selecting it; a pod resolves its own hostname. A name with no ready endpoint is absent, as
  in CoreDNS. There is no kube-proxy: a Service name resolves straight to a pod IP, so a
  client must use the target port (make `port` equal `targetPort`). /etc/resolv.conf names
  no reachable server, so other names fail fast.

Pods: phase Pending -> Running -> Succeeded/Failed computed as the kubelet's `getPhase`;
podIP, hostIP, startTime, conditions (PodScheduled, Initialized, ContainersReady, Ready),
containerStatuses/initContainerStatuses (ready, started, restartCount, state
waiting/running/terminated{exitCode, reason Completed/Error/StartError, message, startedAt,
finishedAt}, lastState). Init containers run in order first. Restart per the pod's
restartPolicy: Always/OnFailure restart in place (restartCount+1, lastState), the first at
once, then with a crash-loop backoff of 0.2 s doubling to 2 s (real: 10 s to 5 min), reset
after 10 s of running. The termination-message file (terminationMessagePath, default
/dev/termination-log) is read after exit (its last 4096 bytes); FallbackToLogsOnError uses
the last 80 lines / 2048 bytes of the log when the file is empty and the exit code is not 0.
Probes (readiness, liveness; httpGet, tcpSocket, exec) run from the root namespace against
the pod IP (exec through nsenter); readiness periods are capped at `probe_period_cap`
(0.5 s) so that Ready comes quickly; liveness keeps its real timing. A pod is deleted
gracefully: the kubelet puts its finalizer `kubelet.faithful-cluster/pod` on every pod it
runs, so a DELETE only sets deletionTimestamp (as the API server does for pods); the kubelet
then sends SIGTERM to every container's PID 1, waits terminationGracePeriodSeconds (default
30), sends SIGKILL, posts the terminal phase and removes its finalizer, and only then is the
object gone. Env: value, valueFrom secretKeyRef / configMapKeyRef / fieldRef
(metadata.name/namespace/uid/labels/annotations, spec.nodeName/serviceAccountName,
status.podIP/hostIP) / resourceFieldRef (limits, else the node's capacity), envFrom, and
Kubernetes `$(VAR)` expansion in env values, command and args; base env PATH (the test
venv's bin first, so `torchrun` and `vlmpretrain` resolve), HOME=/root, HOSTNAME. Volumes:
emptyDir, configMap, secret, downwardAPI, projected (configMap/secret/downwardAPI), hostPath;
configMap/secret contents follow updates. Logs: `<workdir>/pods/<ns>_<name>_<uid>/<container>/<restart>.log`.

Deviations: one node, no scheduler (pods run as soon as they are seen; spec.nodeName stays
unset; nodeSelector, tolerations, resources, securityContext and the image are ignored, all
containers run as root on the host's root filesystem), no image entrypoints unless given in
`images`, no Service env vars, no startupProbe, no preStop/postStart hooks, no OOM kills,
the finalizer above is visible in pod metadata, faster crash-loop backoff and readiness
period. Deployment pods are owned by the Deployment itself (no ReplicaSet).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import fcntl
import hashlib
import ipaddress
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.kubeflow_controller import (Api, ApiStatusError, Informer, LoopThread, WorkQueue, controller_of,
                                               now_iso, obj_key)

log = logging.getLogger(__name__)

PODS, SERVICES, SECRETS, CONFIGMAPS = 'v1/pods', 'v1/services', 'v1/secrets', 'v1/configmaps'
DEPLOYMENTS = 'apps/v1/deployments'
FINALIZER = 'kubelet.faithful-cluster/pod'
NODE_NAME = 'faithful-node'
PREFIX = 'fc'  # names of our bridges (fcb...), veths (fcv...) and netns (fc-<pid>-...)
LOCK_PATH = '/run/faithful-cluster.lock'
MAX_MSG = 4096
HOSTS_HEADER = ('# Kubernetes-managed hosts file (faithful-cluster kubelet).\n127.0.0.1\tlocalhost\n'
                '::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\n'
                'fe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n')


# ======================================================================================= network

def _run(*args: str, input: str | None = None, check: bool = True) -> str:
    import subprocess
    res = subprocess.run(args, input=input, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f'{" ".join(args)}: {res.stderr.strip()}')
    return res.stdout


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale_network() -> list[str]:
    """Delete the netns, veths and bridges of faithful clusters whose process is gone."""
    removed = []
    for line in _run('ip', 'netns', 'list', check=False).splitlines():
        name = line.split()[0] if line.strip() else ''
        m = re.fullmatch(rf'{PREFIX}-(\d+)-\w+', name)
        if m and not _pid_alive(int(m[1])):
            _run('ip', 'netns', 'del', name, check=False)
            removed.append(name)
    for line in _run('ip', '-o', 'link', 'show', check=False).splitlines():
        m = re.match(rf'\d+:\s+({PREFIX}[bv]([0-9a-f]+)x[0-9a-f]+)[@:]', line)
        if m and not _pid_alive(int(m[2], 16)):
            _run('ip', 'link', 'del', m[1], check=False)
            removed.append(m[1])
    return removed


class Network:
    """The cluster's bridge and the pods' network namespaces (see the module docstring)."""

    _counter = 0  # per process: bridge and veth names must be unique across clusters

    def __init__(self) -> None:
        self.pid = os.getpid()
        Network._counter += 1
        self.bridge = f'{PREFIX}b{self.pid:x}x{Network._counter:x}'
        self.subnet: ipaddress.IPv4Network | None = None
        self.host_ip = ''
        self._used: set[str] = set()
        self._next = 2
        self.netns: dict[str, str] = {}  # netns name -> veth

    def setup(self) -> None:
        os.makedirs(os.path.dirname(LOCK_PATH), exist_ok=True)
        with open(LOCK_PATH, 'a') as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            cleanup_stale_network()
            taken = []
            for line in _run('ip', '-o', '-4', 'route', 'show', 'table', 'all').splitlines() + \
                    _run('ip', '-o', '-4', 'addr', 'show').splitlines():
                for tok in re.findall(r'\d+\.\d+\.\d+\.\d+(?:/\d+)?', line):
                    with contextlib.suppress(ValueError):
                        taken.append(ipaddress.ip_network(tok, strict=False))
            rng = random.Random(self.pid * 1000 + Network._counter)
            for _ in range(5000):
                net = ipaddress.ip_network(f'10.{rng.randrange(64, 250)}.{rng.randrange(0, 256)}.0/24')
                if not any(net.overlaps(t) for t in taken if t.prefixlen > 0):
                    break
            else:
                raise RuntimeError('no free 10.x.y.0/24')
            self.subnet = net
            self.host_ip = str(net.network_address + 1)
            _run('ip', 'link', 'add', self.bridge, 'type', 'bridge')
            _run('ip', 'addr', 'add', f'{self.host_ip}/24', 'dev', self.bridge)
            _run('ip', 'link', 'set', self.bridge, 'up')

    def allocate_ip(self) -> str:
        assert self.subnet is not None
        for _ in range(253):
            candidate = str(self.subnet.network_address + self._next)
            self._next = self._next + 1 if self._next < 254 else 2
            if candidate not in self._used:
                self._used.add(candidate)
                return candidate
        raise RuntimeError('the pod subnet is full')

    def release_ip(self, ip: str) -> None:
        self._used.discard(ip)

    async def add_pod(self, ip: str) -> str:
        """A new netns with eth0 = ip/24 and a default route via the bridge; returns its name."""
        Network._counter += 1
        n = Network._counter
        name, veth = f'{PREFIX}-{self.pid}-{n:x}', f'{PREFIX}v{self.pid:x}x{n:x}'
        self.netns[name] = veth
        await _arun('ip', '-batch', '-', input=f'netns add {name}\nlink add {veth} type veth peer name eth0 netns {name}\n'
                                              f'link set {veth} master {self.bridge} up\n')
        await _arun('ip', '-n', name, '-batch', '-', input=f'addr add {ip}/24 dev eth0\nlink set eth0 up\n'
                                                            f'link set lo up\nroute add default via {self.host_ip}\n')
        return name

    async def del_pod(self, name: str) -> None:
        if self.netns.pop(name, None) is not None:
            await _arun('ip', 'netns', 'del', name, check=False)

    def teardown(self) -> None:
        for name in list(self.netns):
            _run('ip', 'netns', 'del', name, check=False)
        self.netns.clear()
        if self.subnet is not None:
            _run('ip', 'link', 'del', self.bridge, check=False)


async def _arun(*args: str, input: str | None = None, check: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate(input.encode() if input else None)
    if check and proc.returncode != 0:
        raise RuntimeError(f'{" ".join(args)}: {err.decode().strip()}')
    return out.decode()


# ======================================================================================= the container shim
# Runs as `python -S shim.py spec.json` (stdlib only, fast start). fd `status_fd` gets
# "PID <pid of PID 1 in the root pid namespace>\n", then "ERR <message>\n" if it could not
# start the command; it reaches EOF when the command was exec'd.

SHIM_SOURCE = r'''
import ctypes, json, os, signal, socket, sys, tempfile
spec = json.load(open(sys.argv[1]))
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
NEWNS, NEWUTS, NEWPID, NEWNET = 0x00020000, 0x04000000, 0x20000000, 0x40000000
status = spec['status_fd']

def report(line):
    os.write(status, (line.replace('\n', ' ') + '\n').encode())

def fail(msg):
    report('ERR ' + msg)
    os._exit(128)

def check(ret, what):
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, '%s: %s' % (what, os.strerror(e)))

def mount(src, tgt, fstype=None, flags=0, data=None):
    check(libc.mount(src.encode() if src else None, tgt.encode(), fstype.encode() if fstype else None, flags,
                     data.encode() if data else None), 'mount %s on %s' % (src, tgt))

def shadow(d, stage):
    """A tmpfs copy of directory d whose entries are bind mounts of the originals."""
    st = tempfile.mkdtemp(dir=stage)
    mount('tmpfs', st, 'tmpfs', 0, 'mode=755')
    for e in os.listdir(d):
        src, dst = os.path.join(d, e), os.path.join(st, e)
        try:
            if os.path.islink(src):
                os.symlink(os.readlink(src), dst)
            elif os.path.isdir(src):
                os.mkdir(dst)
                mount(src, dst, None, MS_BIND | MS_REC)
            else:
                open(dst, 'w').close()
                mount(src, dst, None, MS_BIND)
        except OSError:
            pass
    return st

try:
    check(libc.prctl(1, signal.SIGKILL, 0, 0, 0), 'prctl')  # PR_SET_PDEATHSIG
    if os.getppid() != spec['parent_pid']:
        os._exit(137)
    fd = os.open(spec['netns'], os.O_RDONLY)
    check(libc.setns(fd, NEWNET), 'setns net')
    os.close(fd)
    check(libc.unshare(NEWNS | NEWUTS | NEWPID), 'unshare')
    mount('none', '/', None, MS_REC | MS_PRIVATE)
    socket.sethostname(spec['hostname'])
    mounts = sorted(spec['mounts'], key=lambda m: os.path.normpath(m['target']).count('/'))
    fds = [os.open(m['source'], os.O_PATH) for m in mounts]  # sources may be hidden by earlier mounts
    stage = spec['stage']
    root = '/'
    covered = []  # dirs where creating a mount point touches nothing of the host
    def real(p):
        return os.path.join(root, p.lstrip('/')) if root != '/' else p
    def under(p, dirs):
        return any(p == d or p.startswith(d.rstrip('/') + '/') for d in dirs)
    volume_dirs = []
    for d in spec.get('shadow') or []:  # a private copy, as a runtime gives every container its own /dev
        mount(shadow(d, stage), d, None, MS_BIND | MS_REC)
        covered.append(d)
    for m in mounts:  # pass 1: mount points outside volumes, in shadows
        t = os.path.normpath(m['target'])
        if under(t, volume_dirs) and t not in volume_dirs:
            continue
        if not m['file']:
            volume_dirs.append(t)
        if os.path.lexists(real(t)):
            continue
        a = os.path.dirname(t)
        while not os.path.lexists(real(a)):
            a = os.path.dirname(a)
        if not under(a, covered):
            if a == '/':
                root = shadow('/', stage)
            else:
                mount(shadow(real(a), stage), real(a), None, MS_BIND | MS_REC)
            covered.append(a)
        os.makedirs(real(os.path.dirname(t)), exist_ok=True)
        if m['file']:
            open(real(t), 'a').close()
        else:
            os.mkdir(real(t))
    for m, fd in zip(mounts, fds):  # pass 2: the mounts
        t = real(os.path.normpath(m['target']))
        if not os.path.lexists(t):  # inside a volume
            os.makedirs(os.path.dirname(t), exist_ok=True)
            if m['file']:
                open(t, 'a').close()
            else:
                os.mkdir(t)
        mount('/proc/self/fd/%d' % fd, t, None, MS_BIND | (0 if m['file'] else MS_REC))
        if m.get('readonly'):
            mount('none', t, None, MS_BIND | MS_REMOUNT | MS_RDONLY | (0 if m['file'] else MS_REC))
        os.close(fd)
except Exception as e:
    fail('failed to create the container: %s' % e)

pid = os.fork()
if pid == 0:
    try:
        check(libc.prctl(1, signal.SIGKILL, 0, 0, 0), 'prctl')
        os.set_inheritable(status, False)
        os.set_blocking(status, True)
        if root != '/':
            os.chroot(root)
        try:
            mount('proc', '/proc', 'proc', MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError:
            pass
        try:
            os.chdir(spec['cwd'])
        except OSError as e:
            fail('failed to start the container process: chdir to cwd (%r): %s' % (spec['cwd'], e.strerror))
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        argv = spec['argv']
        os.execvpe(argv[0], argv, spec['env'])
    except OSError as e:
        fail('failed to start the container process: exec: %r: %s' % (spec['argv'][0], e.strerror))
    except BaseException as e:
        fail('failed to start the container process: %r' % (e,))
report('PID %d' % pid)
os.close(status)
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the kubelet signals PID 1 itself
while True:
    try:
        _, st = os.waitpid(pid, 0)
        break
    except InterruptedError:
        continue
code = os.waitstatus_to_exitcode(st)
os._exit(128 - code if code < 0 else code)
'''

NSLOOKUP_SHIM = '''#!/bin/sh
# nslookup stand-in (no DNS server in this cluster: names live in /etc/hosts)
for name in "$@"; do case "$name" in -*) ;; *) target="$name";; esac; done
if out=$(getent hosts "$target"); then
  echo "Name:	$target"; echo "Address: ${out%% *}"; exit 0
fi
echo "** server can't find $target: NXDOMAIN" >&2; exit 1
'''


# ======================================================================================= helpers

def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: defined names are replaced, `$$` is a literal `$`,
    anything else (undefined or malformed references) is left as written."""
    out, i, n = [], 0, len(value)
    while i < n:
        c = value[i]
        if c == '$' and i + 1 < n:
            nxt = value[i + 1]
            if nxt == '$':
                out.append('$')
                i += 2
                continue
            if nxt == '(':
                end = value.find(')', i + 2)
                if end != -1:
                    name = value[i + 2:end]
                    out.append(env[name] if name in env else value[i:end + 1])
                    i = end + 1
                    continue
        out.append(c)
        i += 1
    return ''.join(out)


_QUANTITY = {'Ki': 2 ** 10, 'Mi': 2 ** 20, 'Gi': 2 ** 30, 'Ti': 2 ** 40, 'k': 10 ** 3, 'M': 10 ** 6, 'G': 10 ** 9,
             'T': 10 ** 12, 'm': 1e-3, '': 1}


def quantity(value: Any) -> float:
    m = re.fullmatch(r'([0-9.]+)(Ki|Mi|Gi|Ti|k|M|G|T|m)?', str(value).strip())
    if not m:
        raise ValueError(f'bad quantity {value!r}')
    return float(m[1]) * _QUANTITY[m[2] or '']


def secret_data(secret: dict) -> dict[str, bytes]:
    out = {k: base64.b64decode(v) for k, v in (secret.get('data') or {}).items()}
    # The API server folds stringData into data; the emulator stores it as sent.
    out.update({k: v.encode() for k, v in (secret.get('stringData') or {}).items()})
    return out


def configmap_data(cm: dict) -> dict[str, bytes]:
    out = {k: v.encode() for k, v in (cm.get('data') or {}).items()}
    out.update({k: base64.b64decode(v) for k, v in (cm.get('binaryData') or {}).items()})
    return out


def selector_matches(selector: dict | None, labels: dict | None) -> bool:
    if not selector:
        return False
    labels = labels or {}
    return all(labels.get(k) == v for k, v in selector.items())


def pod_ready(pod: dict) -> bool:
    conds = (pod.get('status') or {}).get('conditions') or []
    return any(c.get('type') == 'Ready' and c.get('status') == 'True' for c in conds)


class ConfigError(Exception):
    """CreateContainerConfigError: the kubelet retries."""


def _tail_log(path: Path, lines: int = 80, limit: int = 2048) -> str:
    try:
        data = path.read_bytes()[-1024 * 1024:]
    except OSError:
        return ''
    chunk = b''.join(data.splitlines(keepends=True)[-lines:])
    return chunk[-limit:].decode(errors='replace')


# ======================================================================================= containers

class Container:
    def __init__(self, spec: dict, init: bool):
        self.spec, self.init, self.name = spec, init, spec['name']
        self.restart_count = 0
        self.instances = 0
        self.state: dict = {'waiting': {'reason': 'PodInitializing' if not init else 'ContainerCreating'}}
        self.last_state: dict = {}
        self.ready = False
        self.started = False
        self.proc: asyncio.subprocess.Process | None = None
        self.pid: int | None = None
        self.container_id = ''
        self.started_at = 0.0
        self.log_path: Path | None = None
        self.probe_tasks: list[asyncio.Task] = []
        self.kill_reason = ''
        self.backoff = 0.0

    def status(self) -> dict:
        out = {'name': self.name, 'image': self.spec.get('image', ''), 'imageID': '', 'ready': self.ready,
               'restartCount': self.restart_count, 'started': self.started, 'state': copy.deepcopy(self.state),
               'lastState': copy.deepcopy(self.last_state)}
        if self.container_id:
            out['containerID'] = self.container_id
        return out

    @property
    def running(self) -> bool:
        return 'running' in self.state


class PodWorker:
    """Runs one pod (sandbox, containers, probes, status, termination)."""

    def __init__(self, kubelet: Kubelet, pod: dict):
        self.k = kubelet
        self.pod = pod
        meta = pod['metadata']
        self.uid, self.ns, self.name = meta['uid'], meta['namespace'], meta['name']
        self.spec = pod.get('spec') or {}
        self.dir = kubelet.workdir / 'pods' / f'{self.ns}_{self.name}_{self.uid}'
        self.hostname = (self.spec.get('hostname') or self.name)[:63]
        self.init = [Container(c, True) for c in self.spec.get('initContainers') or []]
        self.main = [Container(c, False) for c in self.spec.get('containers') or []]
        self.ip = ''
        self.netns = ''
        self.start_time = ''
        self.terminating = False
        self.deleted = False  # the object is gone
        self.lost = False
        self.done = asyncio.Event()  # containers all stopped for good
        self.finished = asyncio.Event()  # the worker is completely done (object released)
        self.initialized = False
        self.phase = 'Pending'
        self.conditions: dict[str, dict] = {}
        self.volumes: dict[str, Path] = {}
        self.wake = asyncio.Event()  # config changed: retry what waits for it
        self._status_lock = asyncio.Lock()
        self.task: asyncio.Task | None = None
        self.hosts_path = self.dir / 'etc-hosts'
        self._hosts_content = ''
        self.own_hosts = ''

    # ------------------------------------------------------------------------- lifecycle
    async def run(self) -> None:
        try:
            if not await self._admit():
                return
            await self._sandbox()
            if not self.terminating:
                await self._run_containers()
            await self.done.wait()
            await self._finish()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception('pod %s/%s worker failed', self.ns, self.name)
        finally:
            self.finished.set()

    async def _admit(self) -> bool:
        fins = list(self.pod['metadata'].get('finalizers') or [])
        if FINALIZER not in fins:
            try:
                patch = {'metadata': {'finalizers': fins + [FINALIZER],
                                      'resourceVersion': self.pod['metadata']['resourceVersion']}}
                self.pod = await self.k.api.merge(PODS, self.ns, self.name, patch)
            except ApiStatusError as e:
                if e.code == 409:  # changed meanwhile: take the latest and retry
                    latest = await self.k.api.get(PODS, self.ns, self.name)
                    if latest is None or latest['metadata']['uid'] != self.uid:
                        return False
                    self.pod = latest
                    return await self._admit()
                if e.code == 404:
                    return False
                raise
        if self.pod['metadata'].get('deletionTimestamp'):
            self.terminating = True
        return True

    async def _sandbox(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ip = self.k.net.allocate_ip()
        self.netns = await self.k.net.add_pod(self.ip)
        self.start_time = now_iso()
        fqdn = ''
        if self.spec.get('subdomain'):
            fqdn = f'{self.hostname}.{self.spec["subdomain"]}.{self.ns}.svc.cluster.local'
        (self.dir / 'etc-hostname').write_text(self.hostname + '\n')
        (self.dir / 'etc-resolv.conf').write_text(
            f'search {self.ns}.svc.cluster.local svc.cluster.local cluster.local\nnameserver 127.0.0.1\n'
            'options ndots:5 timeout:1 attempts:1\n')
        self.own_hosts = f'{self.ip}\t{fqdn}\t{self.hostname}\n' if fqdn else f'{self.ip}\t{self.hostname}\n'
        for alias in self.spec.get('hostAliases') or []:
            self.own_hosts += f'{alias["ip"]}\t' + '\t'.join(alias.get('hostnames') or []) + '\n'
        self.hosts_path.write_text('')
        self.refresh_hosts()
        await self.post_status()

    def refresh_hosts(self) -> None:
        """Rewrite /etc/hosts in place (the same inode is bind-mounted in the containers)."""
        if not self.ip:
            return
        content = HOSTS_HEADER + '\n' + self.own_hosts + self.k.dns_records(self.ns, self.hostname)
        if content != self._hosts_content:
            fd = os.open(self.hosts_path, os.O_WRONLY | os.O_TRUNC)
            try:
                os.write(fd, content.encode())
            finally:
                os.close(fd)
            self._hosts_content = content

    async def _run_containers(self) -> None:
        policy = self.spec.get('restartPolicy') or 'Always'
        for c in self.init:
            while not self.terminating:
                code = await self._run_once(c)
                if code == 0:
                    break
                if code is None:
                    continue  # config error, retried
                if policy == 'Never':
                    self.done.set()
                    await self.post_status()
                    return
                await self._backoff(c)
            if self.terminating:
                self.done.set()
                return
        self.initialized = True
        for c in self.main:
            c.state = {'waiting': {'reason': 'ContainerCreating'}}
        await self.post_status()
        await asyncio.gather(*(self._supervise(c) for c in self.main))
        self.done.set()

    async def _supervise(self, c: Container) -> None:
        policy = self.spec.get('restartPolicy') or 'Always'
        while not self.terminating:
            code = await self._run_once(c)
            if code is None:
                continue
            if self.terminating:
                break
            if not (policy == 'Always' or (policy == 'OnFailure' and code != 0)):
                break
            await self._backoff(c)
        await self.post_status()

    async def _backoff(self, c: Container) -> None:
        ran = time.monotonic() - c.started_at
        if ran >= 10:
            c.backoff = 0.0
        delay = c.backoff
        c.backoff = min(max(delay * 2, self.k.backoff[0]), self.k.backoff[1])
        if delay > 0 and not self.terminating:
            c.last_state = {'terminated': c.state.get('terminated', {})} if 'terminated' in c.state else c.last_state
            c.state = {'waiting': {'reason': 'CrashLoopBackOff', 'message':
                                   f'back-off {delay:g}s restarting failed container={c.name} pod={self.name}_{self.ns}({self.uid})'}}
            await self.post_status()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._terminating_event().wait(), delay)

    def _terminating_event(self) -> asyncio.Event:
        if not hasattr(self, '_term_event'):
            self._term_event = asyncio.Event()
        return self._term_event

    async def _run_once(self, c: Container) -> int | None:
        """Start one instance of c and wait for it; the exit code, or None on a config error
        (after waiting for a change)."""
        try:
            try:
                argv, env = self._render(c)
                mounts = self._mounts(c)
            except ConfigError:  # our informers may lag the API server: look once more
                await self.k.refresh_config(self.ns)
                argv, env = self._render(c)
                mounts = self._mounts(c)
        except ConfigError as e:
            c.state = {'waiting': {'reason': 'CreateContainerConfigError', 'message': str(e)}}
            await self.post_status()
            self.wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), 1.0)
            return None
        if c.instances:
            c.restart_count += 1
            if 'terminated' in c.state:
                c.last_state = {'terminated': c.state['terminated']}
        c.instances += 1
        cdir = self.dir / c.name
        cdir.mkdir(parents=True, exist_ok=True)
        c.log_path = cdir / f'{c.restart_count}.log'
        term_path = cdir / f'termination-log-{c.restart_count}'
        term_path.write_bytes(b'')
        mounts.append({'source': str(term_path), 'target': c.spec.get('terminationMessagePath') or '/dev/termination-log',
                       'file': True})
        c.container_id = f'faithful://{hashlib.sha1(f"{self.uid}/{c.name}/{c.restart_count}".encode()).hexdigest()}'
        rfd, wfd = os.pipe()
        spec_path = cdir / f'spec-{c.restart_count}.json'
        stage = cdir / f'stage-{c.restart_count}'
        stage.mkdir(exist_ok=True)
        spec_path.write_text(json.dumps({
            'status_fd': wfd, 'parent_pid': os.getpid(), 'netns': f'/run/netns/{self.netns}', 'hostname': self.hostname,
            'mounts': mounts, 'shadow': ['/dev'], 'stage': str(stage), 'cwd': c.spec.get('workingDir') or '/', 'argv': argv, 'env': env}))
        started = now_iso()
        with open(c.log_path, 'ab') as logf:
            c.proc = await asyncio.create_subprocess_exec(
                sys.executable, '-S', str(self.k.shim_path), str(spec_path), stdin=asyncio.subprocess.DEVNULL,
                stdout=logf, stderr=logf, pass_fds=(wfd,), start_new_session=True)
        os.close(wfd)
        report = await _read_pipe(rfd)
        pid_line = next((ln for ln in report.splitlines() if ln.startswith('PID ')), '')
        err = next((ln[4:] for ln in report.splitlines() if ln.startswith('ERR ')), '')
        c.pid = int(pid_line[4:]) if pid_line else None
        c.started_at = time.monotonic()
        if self.terminating and c.pid:  # terminate() ran while this instance was starting
            with contextlib.suppress(ProcessLookupError):
                os.kill(c.pid, signal.SIGKILL)
        if not err:
            c.state = {'running': {'startedAt': started}}
            c.started = True
            c.ready = False
            self._start_probes(c)
            await self.post_status()
        code = await c.proc.wait()
        if code < 0:  # the shim itself was killed
            code = 128 - code
        for t in c.probe_tasks:
            t.cancel()
        c.probe_tasks = []
        c.ready = c.started = False
        c.pid = None
        finished = now_iso()
        if err:
            c.state = {'terminated': {'exitCode': 128, 'reason': 'StartError', 'message': err, 'startedAt':
                                      '1970-01-01T00:00:00Z', 'finishedAt': finished, 'containerID': c.container_id}}
            self.k.messages.append({'pod': self.name, 'namespace': self.ns, 'container': c.name, 'exitCode': 128,
                                    'message': err})
            await self.post_status()
            return 128
        message = term_path.read_bytes()[-MAX_MSG:].decode(errors='replace') if term_path.exists() else ''
        if not message and code != 0 and c.spec.get('terminationMessagePolicy') == 'FallbackToLogsOnError':
            message = _tail_log(c.log_path)
        term = {'exitCode': code, 'reason': 'Completed' if code == 0 else 'Error', 'startedAt': started,
                'finishedAt': finished, 'containerID': c.container_id}
        if code > 128 and code - 128 < 65:
            term['signal'] = code - 128
        if message:
            term['message'] = message
        c.state = {'terminated': term}
        self.k.messages.append({'pod': self.name, 'namespace': self.ns, 'container': c.name, 'exitCode': code,
                                'message': message})
        await self.post_status()
        return code

    # ------------------------------------------------------------------------- rendering
    def _field(self, path: str) -> str:
        meta = self.pod['metadata']
        m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if m:
            return (meta.get(m[1]) or {}).get(m[2], '')
        values = {'metadata.name': self.name, 'metadata.namespace': self.ns, 'metadata.uid': self.uid,
                  'spec.nodeName': self.spec.get('nodeName') or NODE_NAME,
                  'spec.serviceAccountName': self.spec.get('serviceAccountName') or 'default',
                  'status.podIP': self.ip, 'status.podIPs': self.ip, 'status.hostIP': self.k.net.host_ip,
                  'status.hostIPs': self.k.net.host_ip}
        if path not in values:
            raise ConfigError(f'unsupported fieldRef {path!r}')
        return values[path]

    def _resource(self, c: Container, ref: dict) -> str:
        res = ref['resource']
        kind, _, what = res.partition('.')
        spec_c = next((x for x in self.main + self.init if x.name == ref.get('containerName', c.name)), c).spec
        value = ((spec_c.get('resources') or {}).get(kind) or {}).get(what)
        if value is None and kind == 'requests':
            value = ((spec_c.get('resources') or {}).get('limits') or {}).get(what)
        if value is None:
            value = os.cpu_count() if what == 'cpu' else os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
        divisor = quantity(ref.get('divisor') or '1')
        return str(math.ceil(quantity(value) / divisor))

    def _get_source(self, resource: str, name: str, optional: bool) -> dict[str, bytes] | None:
        inf = self.k.secrets if resource == SECRETS else self.k.configmaps
        obj = inf.cache.get((self.ns, name))
        if obj is None:
            if optional:
                return None
            raise ConfigError(f'{"secret" if resource == SECRETS else "configmap"} "{name}" not found')
        return secret_data(obj) if resource == SECRETS else configmap_data(obj)

    def _render(self, c: Container) -> tuple[list[str], dict[str, str]]:
        env: dict[str, str] = {'PATH': self.k.path, 'HOSTNAME': self.hostname, 'HOME': '/root', **self.k.extra_env}
        declared: dict[str, str] = {}
        for src in c.spec.get('envFrom') or []:
            prefix = src.get('prefix', '')
            ref = src.get('configMapRef') or src.get('secretRef')
            res = SECRETS if 'secretRef' in src else CONFIGMAPS
            data = self._get_source(res, ref['name'], bool(ref.get('optional')))
            for k, v in (data or {}).items():
                declared[prefix + k] = v.decode(errors='replace')
        for e in c.spec.get('env') or []:
            name = e['name']
            if 'valueFrom' not in e:
                declared[name] = expand(str(e.get('value', '')), {**env, **declared})
                continue
            vf = e['valueFrom']
            if 'secretKeyRef' in vf or 'configMapKeyRef' in vf:
                res = SECRETS if 'secretKeyRef' in vf else CONFIGMAPS
                ref = vf.get('secretKeyRef') or vf.get('configMapKeyRef')
                optional = bool(ref.get('optional'))
                data = self._get_source(res, ref['name'], optional)
                if data is None:
                    continue
                if ref['key'] not in data:
                    if optional:
                        continue
                    kind = 'Secret' if res == SECRETS else 'ConfigMap'
                    raise ConfigError(f"couldn't find key {ref['key']} in {kind} {self.ns}/{ref['name']}")
                declared[name] = data[ref['key']].decode(errors='replace')
            elif 'fieldRef' in vf:
                declared[name] = self._field(vf['fieldRef']['fieldPath'])
            elif 'resourceFieldRef' in vf:
                declared[name] = self._resource(c, vf['resourceFieldRef'])
        env.update(declared)
        image = self.k.images.get(c.spec.get('image', ''), {})
        command, args = c.spec.get('command'), c.spec.get('args')
        if command:
            argv = list(command) + list(args or [])
        else:
            argv = list(image.get('entrypoint') or []) + list(args if args is not None else image.get('cmd') or [])
        if not argv:
            raise ConfigError(f'no command specified (image {c.spec.get("image")!r} has no entrypoint here)')
        return [expand(str(a), env) for a in argv], env

    def _volume_dir(self, vol: dict) -> Path:
        name = vol['name']
        if name in self.volumes:
            return self.volumes[name]
        if 'hostPath' in vol:
            p = Path(vol['hostPath']['path'])
            if vol['hostPath'].get('type') in ('DirectoryOrCreate',):
                p.mkdir(parents=True, exist_ok=True)
            if not p.exists():
                raise ConfigError(f'hostPath {p} does not exist')
            self.volumes[name] = p
            return p
        d = self.dir / 'volumes' / name
        d.mkdir(parents=True, exist_ok=True)
        self.volumes[name] = d
        self.write_volume(vol)
        return d

    def write_volume(self, vol: dict) -> None:
        """(Re)write a configMap/secret/downwardAPI/projected volume's files."""
        d = self.volumes.get(vol['name'])
        if d is None:
            return
        files: dict[str, bytes] = {}
        sources = [vol] if 'projected' not in vol else vol['projected'].get('sources') or []
        for src in sources:
            if 'configMap' in src or 'secret' in src:
                res = SECRETS if 'secret' in src else CONFIGMAPS
                ref = src.get('secret') or src.get('configMap')
                name = ref.get('secretName') or ref.get('name')
                data = self._get_source(res, name, bool(ref.get('optional')))
                if data is None:
                    continue
                items = ref.get('items')
                if items:
                    for it in items:
                        if it['key'] not in data:
                            if ref.get('optional'):
                                continue
                            raise ConfigError(f"couldn't find key {it['key']} in {name}")
                        files[it['path']] = data[it['key']]
                else:
                    files.update(data)
            elif 'downwardAPI' in src:
                for it in src['downwardAPI'].get('items') or []:
                    if 'fieldRef' in it:
                        path = it['fieldRef']['fieldPath']
                        if path in ('metadata.labels', 'metadata.annotations'):
                            kv = self.pod['metadata'].get(path.split('.')[1]) or {}
                            files[it['path']] = ''.join(f'{k}="{v}"\n' for k, v in sorted(kv.items())).encode()
                        else:
                            files[it['path']] = self._field(path).encode()
        if 'configMap' in vol or 'secret' in vol or 'downwardAPI' in vol or 'projected' in vol:
            for old in d.iterdir():
                if old.name not in files and not any(f.startswith(old.name + '/') for f in files):
                    shutil.rmtree(old) if old.is_dir() else old.unlink()
            for rel, content in files.items():
                p = d / rel
                p.parent.mkdir(parents=True, exist_ok=True)
                if not p.exists() or p.read_bytes() != content:
                    tmp = p.with_name(f'.{p.name}.tmp')
                    tmp.write_bytes(content)
                    os.replace(tmp, p)

    def _mounts(self, c: Container) -> list[dict]:
        vols = {v['name']: v for v in self.spec.get('volumes') or []}
        mounts = [{'source': str(self.hosts_path), 'target': '/etc/hosts', 'file': True},
                  {'source': str(self.dir / 'etc-hostname'), 'target': '/etc/hostname', 'file': True},
                  {'source': str(self.dir / 'etc-resolv.conf'), 'target': '/etc/resolv.conf', 'file': True}]
        for vm in c.spec.get('volumeMounts') or []:
            vol = vols.get(vm['name'])
            if vol is None:
                raise ConfigError(f'volume {vm["name"]!r} not found')
            src = self._volume_dir(vol)
            if vm.get('subPath'):
                src = src / vm['subPath']
                if not src.exists():
                    src.mkdir(parents=True)
            ro = bool(vm.get('readOnly')) or any(k in vol for k in ('configMap', 'secret', 'downwardAPI', 'projected'))
            mounts.append({'source': str(src), 'target': vm['mountPath'], 'file': src.is_file(), 'readonly': ro})
        return mounts

    # ------------------------------------------------------------------------- probes
    def _start_probes(self, c: Container) -> None:
        if c.init:
            return
        if c.spec.get('readinessProbe'):
            c.probe_tasks.append(asyncio.get_running_loop().create_task(self._probe_loop(c, c.spec['readinessProbe'], True)))
        else:
            c.ready = True
        if c.spec.get('livenessProbe'):
            c.probe_tasks.append(asyncio.get_running_loop().create_task(self._probe_loop(c, c.spec['livenessProbe'], False)))

    async def _probe_loop(self, c: Container, probe: dict, readiness: bool) -> None:
        period = float(probe.get('periodSeconds') or 10)
        if readiness:
            period = min(period, self.k.probe_period_cap)
        timeout = float(probe.get('timeoutSeconds') or 1)
        ok_needed, fail_needed = int(probe.get('successThreshold') or 1), int(probe.get('failureThreshold') or 3)
        await asyncio.sleep(float(probe.get('initialDelaySeconds') or 0))
        ok = bad = 0
        while c.running:
            good = await self._probe(c, probe, timeout)
            ok, bad = (ok + 1, 0) if good else (0, bad + 1)
            if readiness:
                ready = c.ready
                if ok >= ok_needed:
                    ready = True
                elif bad >= fail_needed or (not c.ready and not good):
                    ready = False
                if ready != c.ready:
                    c.ready = ready
                    await self.post_status()
            elif bad >= fail_needed:
                c.kill_reason = 'liveness probe failed'
                await self._stop_container(c, self._grace())
                return
            await asyncio.sleep(period)

    async def _probe(self, c: Container, probe: dict, timeout: float) -> bool:
        def port_of(p: Any) -> int:
            if isinstance(p, int) or str(p).isdigit():
                return int(p)
            for port in c.spec.get('ports') or []:
                if port.get('name') == p:
                    return int(port['containerPort'])
            raise ValueError(f'no port named {p}')
        try:
            if 'httpGet' in probe:
                h = probe['httpGet']
                host = h.get('host') or self.ip
                url = f'{(h.get("scheme") or "HTTP").lower()}://{host}:{port_of(h["port"])}{h.get("path") or "/"}'
                headers = {x['name']: x['value'] for x in h.get('httpHeaders') or []}
                async with self.k.http.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout),
                                           allow_redirects=False) as resp:
                    return 200 <= resp.status < 400
            if 'tcpSocket' in probe:
                t = probe['tcpSocket']
                _, w = await asyncio.wait_for(asyncio.open_connection(t.get('host') or self.ip, port_of(t['port'])), timeout)
                w.close()
                return True
            if 'exec' in probe and c.pid:
                proc = await asyncio.create_subprocess_exec(
                    'nsenter', '-t', str(c.pid), '-n', '-m', '-u', '-p', '-r', '-w', *probe['exec']['command'],
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
                try:
                    return await asyncio.wait_for(proc.wait(), timeout) == 0
                except asyncio.TimeoutError:
                    proc.kill()
                    return False
        except (OSError, asyncio.TimeoutError, aiohttp.ClientError, ValueError):
            return False
        return False

    # ------------------------------------------------------------------------- status
    def _compute_phase(self) -> str:
        """kubelet getPhase."""
        policy = self.spec.get('restartPolicy') or 'Always'
        init_failed = any('terminated' in c.state and c.state['terminated']['exitCode'] != 0 for c in self.init) \
            and policy == 'Never' and not self.initialized
        if init_failed:
            return 'Failed'
        if not self.initialized:
            return 'Pending'
        running = waiting = stopped = succeeded = 0
        for c in self.main:
            if 'running' in c.state:
                running += 1
            elif 'terminated' in c.state:
                stopped += 1
                succeeded += c.state['terminated']['exitCode'] == 0
            elif c.last_state.get('terminated'):
                stopped += 1
            else:
                waiting += 1
        if waiting:
            return 'Pending'
        if running:
            return 'Running'
        if stopped:
            if self.terminating and self.done.is_set():
                return 'Succeeded' if stopped == succeeded else 'Failed'
            if policy == 'Always':
                return 'Running'
            if stopped == succeeded:
                return 'Succeeded'
            if policy == 'Never':
                return 'Failed'
            return 'Running'
        return 'Pending'

    def _set_condition(self, ctype: str, ok: bool, reason: str = '', message: str = '') -> None:
        status = 'True' if ok else 'False'
        old = self.conditions.get(ctype)
        cond = {'type': ctype, 'status': status, 'lastProbeTime': None,
                'lastTransitionTime': old['lastTransitionTime'] if old and old['status'] == status else now_iso()}
        if not ok and reason:
            cond.update(reason=reason, message=message)
        self.conditions[ctype] = cond

    def status(self) -> dict:
        phase = self.phase = self._compute_phase()
        terminal = phase in ('Succeeded', 'Failed')
        self._set_condition('PodScheduled', True)
        pending_init = [c.name for c in self.init if not ('terminated' in c.state and c.state['terminated']['exitCode'] == 0)]
        self._set_condition('Initialized', self.initialized or not pending_init, 'ContainersNotInitialized',
                            f'containers with incomplete status: [{" ".join(pending_init)}]')
        unready = [c.name for c in self.main if not c.ready]
        reason = 'PodCompleted' if terminal else 'ContainersNotReady'
        msg = '' if terminal else f'containers with unready status: [{" ".join(unready)}]'
        self._set_condition('ContainersReady', not unready, reason, msg)
        self._set_condition('Ready', not unready, reason, msg)
        out: dict[str, Any] = {
            'phase': phase, 'hostIP': self.k.net.host_ip, 'hostIPs': [{'ip': self.k.net.host_ip}],
            'conditions': [self.conditions[t] for t in ('Initialized', 'Ready', 'ContainersReady', 'PodScheduled')],
            'containerStatuses': [c.status() for c in self.main], 'qosClass': 'BestEffort'}
        if self.ip:
            out.update(podIP=self.ip, podIPs=[{'ip': self.ip}])
        if self.start_time:
            out['startTime'] = self.start_time
        if self.init:
            out['initContainerStatuses'] = [c.status() for c in self.init]
        return out

    async def post_status(self) -> None:
        if self.deleted or self.lost:
            return
        async with self._status_lock:
            try:
                await self.k.api.merge(PODS, self.ns, self.name, {'status': self.status()}, sub='status')
            except ApiStatusError as e:
                if e.code == 404:
                    self.deleted = True
                else:
                    log.warning('pod %s/%s status: %r', self.ns, self.name, e)

    # ------------------------------------------------------------------------- termination
    def _grace(self) -> float:
        g = self.spec.get('terminationGracePeriodSeconds')
        return float(30 if g is None else g)

    async def _stop_container(self, c: Container, grace: float) -> None:
        pid, proc = c.pid, c.proc
        if pid is None or proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), grace)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            await proc.wait()

    async def terminate(self) -> None:
        """Graceful: SIGTERM every running container, SIGKILL after the grace period."""
        if self.terminating and getattr(self, '_terminate_started', False):
            return
        self.terminating = True
        self._terminate_started = True
        self._terminating_event().set()
        self.wake.set()
        grace = self._grace()
        await asyncio.gather(*(self._stop_container(c, grace) for c in self.init + self.main))
        if not self.initialized or not self.main:
            self.done.set()

    def kill_all(self) -> None:
        """SIGKILL every process of the pod now (node lost)."""
        self.terminating = True
        self._terminating_event().set()
        for c in self.init + self.main:
            for pid in (c.pid, c.proc.pid if c.proc and c.proc.returncode is None else None):
                if pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)

    async def _finish(self) -> None:
        """All containers stopped for good: post the final status, drop the sandbox, and
        when the pod is being deleted, release it."""
        await self.post_status()
        if self.netns:
            await self.k.net.del_pod(self.netns)
            self.netns = ''
        while not self.terminating and not self.deleted:
            # A completed pod stays until it is deleted.
            self.wake.clear()
            await self.wake.wait()
        if not self.deleted:
            await self.post_status()
            await self._release()
        self.k.net.release_ip(self.ip)

    async def _release(self) -> None:
        for _ in range(20):
            pod = await self.k.api.get(PODS, self.ns, self.name)
            if pod is None or pod['metadata']['uid'] != self.uid:
                return
            fins = [f for f in pod['metadata'].get('finalizers') or [] if f != FINALIZER]
            try:
                await self.k.api.merge(PODS, self.ns, self.name, {'metadata': {
                    'finalizers': fins or None, 'resourceVersion': pod['metadata']['resourceVersion']}})
                return
            except ApiStatusError as e:
                if e.code == 404:
                    return
                if e.code != 409:
                    raise


async def _read_pipe(fd: int) -> str:
    """Everything until EOF from a pipe's read end, without blocking the loop."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, 'rb', 0))
    try:
        return (await reader.read()).decode(errors='replace')
    finally:
        transport.close()


# ======================================================================================= the kubelet

class Kubelet(LoopThread):
    """Runs every pod of the emulator on this machine (see the module docstring)."""

    def __init__(self, url: str, workdir: str | Path, *, network: Network | None = None,
                 extra_env: dict[str, str] | None = None, images: dict[str, dict] | None = None,
                 probe_period_cap: float = 0.5, backoff: tuple[float, float] = (0.2, 2.0)):
        super().__init__('faithful-kubelet')
        self.url = url
        self.workdir = Path(workdir)
        self.net = network or Network()
        self._own_net = network is None
        self.extra_env = dict(extra_env or {})
        self.images = dict(images or {})
        self.probe_period_cap = probe_period_cap
        self.backoff = backoff
        venv_bin = os.path.dirname(sys.executable)
        self.bin_dir = self.workdir / 'bin'
        self.path = f'{venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:{self.bin_dir}'
        self.shim_path = self.workdir / 'shim.py'
        self.workers: dict[str, PodWorker] = {}
        self.messages: list[dict] = []  # every container exit: pod, namespace, container, exitCode, message
        self._dns: list[tuple[str, str, str, bool]] = []
        self._seen: set[str] = set()

    @property
    def host_ip(self) -> str:
        return self.net.host_ip

    async def _astart(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.bin_dir.mkdir(exist_ok=True)
        self.shim_path.write_text(SHIM_SOURCE)
        (self.bin_dir / 'nslookup').write_text(NSLOOKUP_SHIM)
        (self.bin_dir / 'nslookup').chmod(0o755)
        if self._own_net:
            await asyncio.get_running_loop().run_in_executor(None, self.net.setup)
        self.api = Api(self.url, 'kubelet/faithful')
        await self.api.open()
        self.http = aiohttp.ClientSession(trust_env=False)
        self.secrets = Informer(self.api, SECRETS, self._on_config)
        self.configmaps = Informer(self.api, CONFIGMAPS, self._on_config)
        self.services = Informer(self.api, SERVICES, lambda *a: self._dns_changed())
        self.pods = Informer(self.api, PODS, self._on_pod)
        for inf in (self.secrets, self.configmaps, self.services):
            self.spawn(inf.run())
        await asyncio.wait_for(asyncio.gather(*(i.synced.wait() for i in (self.secrets, self.configmaps, self.services))), 10)
        self.spawn(self.pods.run())
        await asyncio.wait_for(self.pods.synced.wait(), 10)

    async def _astop(self) -> None:
        workers = list(self.workers.values())
        for w in workers:
            w.kill_all()
        for w in workers:
            for c in w.init + w.main:
                if c.proc is not None and c.proc.returncode is None:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(c.proc.wait(), 5)
        for w in workers:
            if w.task:
                w.task.cancel()
        await asyncio.gather(*(w.task for w in workers if w.task), return_exceptions=True)
        await self.cancel_spawned()
        await self.http.close()
        await self.api.close()
        for w in workers:
            if w.netns:
                await self.net.del_pod(w.netns)
        if self._own_net:
            self.net.teardown()

    # ------------------------------------------------------------------------- events
    def _on_pod(self, kind: str, pod: dict, old: dict | None) -> None:
        uid = pod['metadata'].get('uid')
        w = self.workers.get(uid)
        if kind == 'DELETED':
            if w is not None:
                w.deleted = True
                w.wake.set()
                if not w.done.is_set():
                    asyncio.get_running_loop().create_task(w.terminate())
        elif w is None:
            phase = (pod.get('status') or {}).get('phase')
            if phase in ('Succeeded', 'Failed') or uid in self._seen:
                pass
            elif pod['metadata'].get('deletionTimestamp') and FINALIZER not in (pod['metadata'].get('finalizers') or []):
                pass
            else:
                self._seen.add(uid)
                w = self.workers[uid] = PodWorker(self, pod)
                w.task = asyncio.get_running_loop().create_task(w.run())
                w.task.add_done_callback(lambda t, uid=uid: self._worker_done(uid))
        else:
            w.pod = pod
            if pod['metadata'].get('deletionTimestamp') and not w.terminating:
                asyncio.get_running_loop().create_task(w.terminate())
            elif pod['metadata'].get('deletionTimestamp'):
                w.wake.set()
        self._dns_changed()

    def _worker_done(self, uid: str) -> None:
        self.workers.pop(uid, None)

    async def refresh_config(self, ns: str) -> None:
        for inf in (self.secrets, self.configmaps):
            items, _ = await self.api.list(inf.resource, ns)
            for obj in items:
                inf.cache.setdefault(obj_key(obj), obj)

    def _on_config(self, kind: str, obj: dict, old: dict | None) -> None:
        ns = obj['metadata'].get('namespace')
        for w in list(self.workers.values()):
            if w.ns != ns:
                continue
            w.wake.set()
            for vol in w.spec.get('volumes') or []:
                if vol['name'] in w.volumes and any(k in vol for k in ('configMap', 'secret', 'projected')):
                    with contextlib.suppress(ConfigError, OSError):
                        w.write_volume(vol)

    def _dns_changed(self) -> None:
        self._dns = self._compute_dns()
        for w in list(self.workers.values()):
            with contextlib.suppress(OSError):
                w.refresh_hosts()

    def _compute_dns(self) -> list[tuple[str, str, str, bool]]:
        """(namespace, name, ip, same-namespace-only) for every name cluster DNS would answer."""
        pods = [p for p in self.pods.cache.values()
                if (p.get('status') or {}).get('podIP') and not p['metadata'].get('deletionTimestamp')]
        pods.sort(key=lambda p: (p['metadata'].get('creationTimestamp', ''), p['metadata']['name']))
        out: list[tuple[str, str, str, bool]] = []
        seen: set[str] = set()

        def add(ns: str, name: str, ip: str, local: bool) -> None:
            key = f'{ns}\0{name}' if local else name
            if key not in seen:
                seen.add(key)
                out.append((ns, name, ip, local))
        for svc in sorted(self.services.cache.values(), key=lambda s: obj_key(s)):
            ns, name = obj_key(svc)
            sspec = svc.get('spec') or {}
            selector = sspec.get('selector')
            not_ready_ok = bool(sspec.get('publishNotReadyAddresses'))
            eps = [p for p in pods if p['metadata']['namespace'] == ns and selector_matches(selector, p['metadata'].get('labels'))
                   and (not_ready_ok or pod_ready(p))]
            if eps:
                ip = eps[0]['status']['podIP']
                add(ns, name, ip, True)
                for n in (f'{name}.{ns}', f'{name}.{ns}.svc', f'{name}.{ns}.svc.cluster.local'):
                    add(ns, n, ip, False)
            for p in eps:
                ps = p.get('spec') or {}
                if ps.get('subdomain') == name:
                    h, ip = (ps.get('hostname') or p['metadata']['name'])[:63], p['status']['podIP']
                    add(ns, f'{h}.{name}', ip, True)
                    for n in (f'{h}.{name}.{ns}', f'{h}.{name}.{ns}.svc', f'{h}.{name}.{ns}.svc.cluster.local'):
                        add(ns, n, ip, False)
        return out

    def dns_records(self, ns: str, own_hostname: str) -> str:
        """The cluster DNS names a pod in `ns` resolves, as /etc/hosts lines."""
        return ''.join(f'{ip}\t{name}\n' for rec_ns, name, ip, local in self._dns
                       if (not local or rec_ns == ns) and name != own_hostname)

    # ------------------------------------------------------------------------- test-facing (thread-safe)
    def _worker_for(self, pod: str, namespace: str) -> PodWorker:
        for w in self.workers.values():
            if w.name == pod and w.ns == namespace and not w.lost:
                return w
        raise LookupError(f'pod {namespace}/{pod} is not running on this kubelet')

    def container_pid(self, pod: str, container: str | None = None, namespace: str = 'default') -> int:
        """The host pid of a running container's main process (its children are its workers)."""
        def do() -> int:
            w = self._worker_for(pod, namespace)
            c = next((c for c in w.main if container in (None, c.name) and c.pid), None)
            if c is None:
                raise LookupError(f'no running container {container or ""} in {namespace}/{pod}')
            return c.pid
        return self.call(do)

    def kill_container(self, pod: str, sig: int = signal.SIGKILL, container: str | None = None,
                       namespace: str = 'default') -> int:
        """Send sig to the container's main process (PID 1 of the container); returns its pid.
        It restarts per the pod's restartPolicy. PID 1 ignores signals it has no handler for."""
        def do() -> int:
            w = self._worker_for(pod, namespace)
            c = next((c for c in w.main if container in (None, c.name) and c.pid), None)
            if c is None:
                raise LookupError(f'no running container {container or ""} in {namespace}/{pod}')
            os.kill(c.pid, sig)
            return c.pid
        return self.call(do)

    def lose_node(self, pod: str, namespace: str = 'default') -> None:
        """The node is gone: every process of the pod is SIGKILLed at once and the pod object
        is deleted immediately (as the node lifecycle controller + pod GC end up doing)."""
        async def do() -> None:
            w = self._worker_for(pod, namespace)
            w.lost = True
            w.kill_all()
            await self.api.delete(PODS, namespace, pod)
            p = await self.api.get(PODS, namespace, pod)
            if p is not None and p['metadata']['uid'] == w.uid:
                fins = [f for f in p['metadata'].get('finalizers') or [] if f != FINALIZER]
                with contextlib.suppress(ApiStatusError):
                    await self.api.merge(PODS, namespace, pod, {'metadata': {'finalizers': fins or None}})
            w.deleted = True
            w.wake.set()
        self.call(do)

    def evict(self, pod: str, namespace: str = 'default') -> None:
        """Graceful deletion (what the eviction API does once allowed)."""
        self.call(self.api.delete, PODS, namespace, pod)

    def logs(self, pod: str, namespace: str = 'default', container: str | None = None, previous: bool = False) -> str:
        """The container's log (the current instance, or the previous one)."""
        base = None
        for d in sorted((self.workdir / 'pods').glob(f'{namespace}_{pod}_*'), key=lambda p: p.stat().st_mtime):
            base = d
        if base is None:
            raise LookupError(f'no logs for {namespace}/{pod}')
        cdirs = sorted(p for p in base.iterdir() if p.is_dir() and p.name != 'volumes')
        cdir = next((p for p in cdirs if p.name == container), None) if container else \
            next((p for p in cdirs if p.name == 'pytorch'), cdirs[0] if cdirs else None)
        if cdir is None:
            raise LookupError(f'no container {container} in {namespace}/{pod}')
        logs = sorted(cdir.glob('*.log'), key=lambda p: int(p.stem))
        if not logs:
            return ''
        chosen = logs[-2] if previous and len(logs) > 1 else logs[-1]
        return chosen.read_text(errors='replace')


# ======================================================================================= GC

class GarbageCollector(LoopThread):
    """ownerReference garbage collection with background propagation: an object whose owners
    (by uid) are all gone is deleted; dangling references next to live owners are dropped.
    The owner's absence is confirmed with a GET, as the real collector does."""

    def __init__(self, url: str, resources: dict[str, Any]):
        super().__init__('faithful-gc')
        self.url = url
        self.resources = {k: v for k, v in resources.items()
                          if k not in ('v1/events', 'v1/namespaces', 'apiextensions.k8s.io/v1/customresourcedefinitions')}
        self.kinds: dict[tuple[str, str], str] = {}
        for key, info in resources.items():
            group_version = key.rsplit('/', 1)[0]
            self.kinds[(group_version, info.kind)] = key
        self.deleted: list[tuple[str, str | None, str]] = []

    async def _astart(self) -> None:
        self.api = Api(self.url, 'garbage-collector/faithful')
        await self.api.open()
        self.queue = WorkQueue()
        self.live: dict[str, tuple[str, str | None, str]] = {}
        self.dependents: dict[str, set[tuple[str, str | None, str]]] = {}
        self.informers = [Informer(self.api, res, self._handler(res)) for res in self.resources]
        for inf in self.informers:
            self.spawn(inf.run())
        await asyncio.wait_for(asyncio.gather(*(i.synced.wait() for i in self.informers)), 10)
        self.spawn(self._worker())

    async def _astop(self) -> None:
        await self.cancel_spawned()
        await self.api.close()

    def _handler(self, res: str) -> Any:
        def on(kind: str, obj: dict, old: dict | None) -> None:
            meta = obj['metadata']
            key = (res, meta.get('namespace'), meta['name'])
            if kind == 'DELETED':
                self.live.pop(meta['uid'], None)
                for dep in self.dependents.pop(meta['uid'], set()):
                    self.queue.add(dep)
                return
            self.live[meta['uid']] = key
            for ref in meta.get('ownerReferences') or []:
                self.dependents.setdefault(ref.get('uid'), set()).add(key)
                if ref.get('uid') not in self.live:
                    self.queue.add(key)
        return on

    async def _owner_exists(self, ref: dict, ns: str | None) -> bool:
        res = self.kinds.get((ref.get('apiVersion', ''), ref.get('kind', '')))
        if res is None:
            return True  # a kind we do not serve: leave the dependent alone
        namespaced = self.resources.get(res).namespaced if res in self.resources else True
        owner = await self.api.get(res, ns if namespaced else None, ref['name'])
        return owner is not None and owner['metadata'].get('uid') == ref.get('uid')

    async def _worker(self) -> None:
        while True:
            key = await self.queue.get()
            try:
                await self._check(*key)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.debug('gc %s: %r', key, e)
                self.queue.add_after(key, 0.2)
            finally:
                self.queue.done(key)

    async def _check(self, res: str, ns: str | None, name: str) -> None:
        obj = await self.api.get(res, ns, name)
        if obj is None or obj['metadata'].get('deletionTimestamp'):
            return
        refs = obj['metadata'].get('ownerReferences') or []
        if not refs:
            return
        alive = [r for r in refs if await self._owner_exists(r, ns)]
        if not alive:
            self.deleted.append((res, ns, name))
            await self.api.delete(res, ns, name)
        elif len(alive) != len(refs):
            await self.api.merge(res, ns, name, {'metadata': {'ownerReferences': alive}})


# ======================================================================================= Deployments

_SAFE = 'bcdfghjklmnpqrstvwxz2456789'


def template_hash(template: dict) -> str:
    digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).digest()
    return ''.join(_SAFE[b % len(_SAFE)] for b in digest[:10])


class DeploymentController(LoopThread):
    """Deployments without ReplicaSets: `replicas` pods of the template (labels + pod-template-hash,
    owned by the Deployment), a missing or failed pod replaced, a template change rolled out
    (Recreate: the old pods are deleted and gone before new ones start; RollingUpdate: new ones
    are created at once and old ones deleted), status replicas/updatedReplicas/readyReplicas/
    availableReplicas/observedGeneration and the Available condition."""

    def __init__(self, url: str):
        super().__init__('faithful-deployments')
        self.url = url
        self._rng = random.Random()

    async def _astart(self) -> None:
        self.api = Api(self.url, 'deployment-controller/faithful')
        await self.api.open()
        self.queue = WorkQueue()
        self.deployments = Informer(self.api, DEPLOYMENTS, lambda k, o, old: self.queue.add(obj_key(o)))
        self.pods = Informer(self.api, PODS, self._on_pod)
        for inf in (self.deployments, self.pods):
            self.spawn(inf.run())
        await asyncio.wait_for(asyncio.gather(self.deployments.synced.wait(), self.pods.synced.wait()), 10)
        self.spawn(self._worker())

    async def _astop(self) -> None:
        await self.cancel_spawned()
        await self.api.close()

    def _on_pod(self, kind: str, pod: dict, old: dict | None) -> None:
        ref = controller_of(pod)
        if ref and ref.get('kind') == 'Deployment':
            self.queue.add((pod['metadata']['namespace'], ref['name']))

    async def _worker(self) -> None:
        while True:
            key = await self.queue.get()
            try:
                await self.reconcile(*key)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.debug('deployment %s: %r', key, e)
                self.queue.add_after(key, 0.2)
            finally:
                self.queue.done(key)

    async def reconcile(self, ns: str, name: str) -> None:
        d = await self.api.get(DEPLOYMENTS, ns, name)
        if d is None or d['metadata'].get('deletionTimestamp'):
            return
        spec = d.get('spec') or {}
        replicas = int(spec.get('replicas', 1))
        template = spec.get('template') or {}
        h = template_hash(template)
        items, _ = await self.api.list(PODS, ns)
        pods = [p for p in items if (controller_of(p) or {}).get('uid') == d['metadata']['uid']]
        hash_of = lambda p: (p['metadata'].get('labels') or {}).get('pod-template-hash')  # noqa: E731
        live = [p for p in pods if not p['metadata'].get('deletionTimestamp')
                and (p.get('status') or {}).get('phase') not in ('Succeeded', 'Failed')]
        old = [p for p in live if hash_of(p) != h]
        new = [p for p in live if hash_of(p) == h]
        recreate = (spec.get('strategy') or {}).get('type') == 'Recreate'
        for p in old:
            await self.api.delete(PODS, ns, p['metadata']['name'])
        if recreate and any(hash_of(p) != h for p in pods if (p.get('status') or {}).get('phase') not in ('Succeeded', 'Failed')):
            await self._status(d, pods, h)
            return  # wait until the old pods are gone
        for _ in range(replicas - len(new)):
            meta = copy.deepcopy(template.get('metadata') or {})
            meta['labels'] = {**(meta.get('labels') or {}), 'pod-template-hash': h}
            meta['name'] = f'{name}-{h}-' + ''.join(self._rng.choices(_SAFE, k=5))
            meta['ownerReferences'] = [{'apiVersion': 'apps/v1', 'kind': 'Deployment', 'name': name,
                                        'uid': d['metadata']['uid'], 'controller': True, 'blockOwnerDeletion': True}]
            await self.api.create(PODS, ns, {'apiVersion': 'v1', 'kind': 'Pod', 'metadata': meta,
                                             'spec': copy.deepcopy(template.get('spec') or {})})
        if len(new) > replicas:
            extra = sorted(new, key=lambda p: p['metadata'].get('creationTimestamp', ''), reverse=True)[:len(new) - replicas]
            for p in extra:
                await self.api.delete(PODS, ns, p['metadata']['name'])
        await self._status(d, pods, h)

    async def _status(self, d: dict, pods: list[dict], h: str) -> None:
        live = [p for p in pods if not p['metadata'].get('deletionTimestamp')
                and (p.get('status') or {}).get('phase') not in ('Succeeded', 'Failed')]
        ready = sum(1 for p in live if pod_ready(p))
        updated = sum(1 for p in live if (p['metadata'].get('labels') or {}).get('pod-template-hash') == h)
        want = int((d.get('spec') or {}).get('replicas', 1))
        old = d.get('status') or {}
        available = ready >= want
        cond_old = next((c for c in old.get('conditions') or [] if c.get('type') == 'Available'), None)
        status_str = 'True' if available else 'False'
        now = now_iso()
        cond = {'type': 'Available', 'status': status_str,
                'reason': 'MinimumReplicasAvailable' if available else 'MinimumReplicasUnavailable',
                'message': 'Deployment has minimum availability.' if available else
                'Deployment does not have minimum availability.',
                'lastUpdateTime': cond_old['lastUpdateTime'] if cond_old and cond_old['status'] == status_str else now,
                'lastTransitionTime': cond_old['lastTransitionTime'] if cond_old and cond_old['status'] == status_str else now}
        status = {'observedGeneration': d['metadata'].get('generation', 1), 'replicas': len(live),
                  'updatedReplicas': updated, 'readyReplicas': ready, 'availableReplicas': ready,
                  'unavailableReplicas': max(0, want - ready), 'conditions': [cond]}
        status = {k: v for k, v in status.items() if v != 0 or k == 'observedGeneration'}
        comparable = lambda s: {k: v for k, v in s.items() if k != 'conditions'}  # noqa: E731
        if comparable(status) != comparable(old) or (cond_old or {}).get('status') != status_str:
            await self.api.merge(DEPLOYMENTS, d['metadata']['namespace'], d['metadata']['name'],
                                 {'status': {**{k: None for k in old}, **status}}, sub='status')
