"""The faithful cluster's own tests: the PyTorchJob controller against training-operator v1.9.0's
documented rules (tests/support/kubeflow_controller.py names the Go functions), the kubelet
(real processes in their own namespaces), the Deployment controller and the GC."""
from __future__ import annotations

import http.server
import os
import signal
import threading
import time

import psutil
import pytest

from tests.support.faithful_cluster import FaithfulCluster, faithful_cluster  # noqa: F401 (fixture)
from tests.support.kubeflow_controller import JOBS, default_job, parse_time, pod_env
from tests.support.kubelet import DEPLOYMENTS, PODS, SERVICES, cleanup_stale_network, expand

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason='the kubelet needs root (network namespaces)')

SLEEP = 'trap "exit 143" TERM; sleep 30 & wait'  # a PID 1 that honours SIGTERM


def pytorchjob(name: str, command: str, *, replicas: int = 1, restart: str = 'OnFailure', run_policy: dict | None = None,
               elastic: dict | None = None) -> dict:
    container = {'name': 'pytorch', 'image': 'busybox', 'command': ['sh', '-c', command]}
    spec: dict = {'runPolicy': run_policy or {}, 'pytorchReplicaSpecs': {'Worker': {
        'replicas': replicas, 'restartPolicy': restart,
        'template': {'metadata': {'labels': {'app': name}},
                     'spec': {'containers': [container], 'terminationGracePeriodSeconds': 2}}}}}
    if elastic is not None:
        spec['elasticPolicy'] = elastic
    return {'apiVersion': 'kubeflow.org/v1', 'kind': 'PyTorchJob', 'metadata': {'name': name}, 'spec': spec}


def conds(c: FaithfulCluster, job: str) -> dict[str, dict]:
    return {x['type']: x for x in (c.snapshot(JOBS, job) or {}).get('status', {}).get('conditions', [])}


# ======================================================================================= the controller

def test_onfailure_restart_counts_against_backoff_limit(faithful_cluster):
    """PastBackoffLimit: a container restart of a Running OnFailure pod counts; at backoffLimit
    the job fails and every pod and service is deleted (before the job is finished, so
    cleanPodPolicy does not apply)."""
    c = faithful_cluster
    c.create(JOBS, pytorchjob('bo', 'exit 3', run_policy={'backoffLimit': 1}))
    failed = c.wait_job_condition('bo', 'Failed')
    assert failed['reason'] == 'PyTorchJobFailed'
    assert failed['message'] == 'Job bo has failed because it has reached the specified backoff limit'
    restarts = [p['status']['containerStatuses'][0]['restartCount'] for p in c.history(PODS, 'bo-worker-0')
                if p.get('status', {}).get('containerStatuses')]
    assert max(restarts) == 1  # the first crash restarts in place at once
    c.wait_gone(PODS, 'bo-worker-0')
    c.wait_gone(SERVICES, 'bo-worker-0')
    job = c.snapshot(JOBS, 'bo')
    assert job['status']['completionTime'] and job['status']['startTime']
    assert ('Created', 'True', 'PyTorchJobCreated') in c.job_conditions_seen('bo')


def test_exitcode_permanent_fails_job(faithful_cluster):
    """ReconcilePods: ExitCode + a code in 1..127 -> the job fails; the pod (restartPolicy
    Never, SetRestartPolicy) stays, cleanPodPolicy defaulting to None."""
    c = faithful_cluster
    c.create(JOBS, pytorchjob('perm', 'exit 3', restart='ExitCode'))
    failed = c.wait_job_condition('perm', 'Failed')
    assert (failed['reason'], failed['message']) == ('PyTorchJobFailed', 'job "perm" is failing because "Worker" replica(s) failed.')
    pod = c.wait_pod_phase('perm-worker-0', 'Failed')
    assert pod['spec']['restartPolicy'] == 'Never'
    assert pod['status']['containerStatuses'][0]['state']['terminated']['exitCode'] == 3
    assert len(c.history(JOBS, 'perm')) and c.get(PODS, 'perm-worker-0') is not None


def test_exitcode_retryable_recreates_pod(faithful_cluster):
    """IsRetryableExitCode (>= 128): SIGKILL (137) -> the pod is deleted and recreated, the job
    goes Restarting, then Running again."""
    c = faithful_cluster
    c.create(JOBS, pytorchjob('retry', SLEEP, restart='ExitCode'))
    c.wait_job_condition('retry', 'Running')
    old = c.wait_pod('retry-worker-0', lambda p: p['status']['containerStatuses'][0]['state'].get('running') and p)
    c.kill_container('retry-worker-0', signal.SIGKILL)
    assert c.wait_terminated('retry-worker-0')['exitCode'] == 137
    new = c.wait_pod_replaced('retry-worker-0', old['metadata']['uid'])
    c.wait_pod_phase('retry-worker-0', 'Running')
    running = c.wait_for(lambda: (c.snapshot(PODS, 'retry-worker-0')['metadata']['uid'] == new['metadata']['uid']
                                  and conds(c, 'retry').get('Running', {}).get('status') == 'True'
                                  and conds(c, 'retry')), what='job Running again')
    assert 'Restarting' not in running  # filterOutCondition: Running replaces Restarting
    seen = c.job_conditions_seen('retry')
    assert ('Restarting', 'True', 'PyTorchJobRestarting') in seen
    assert 'Failed' not in running


def test_never_fails_job(faithful_cluster):
    """UpdateJobStatus: a failed replica with restartPolicy Never fails the job."""
    c = faithful_cluster
    c.create(JOBS, pytorchjob('nv', f'case $HOSTNAME in *-0) exit 1;; esac; {SLEEP}', replicas=2, restart='Never'))
    failed = c.wait_job_condition('nv', 'Failed')
    assert failed['message'] == 'PyTorchJob nv is failed because 1 Worker replica(s) failed.'
    assert c.snapshot(JOBS, 'nv')['status']['completionTime']


def test_suspend_deletes_pods_and_resume_recreates(faithful_cluster):
    """ReconcileJobs: suspend -> pods and services deleted, Running False, Suspended True;
    resume -> Suspended False (PyTorchJobResumed), a new startTime, pods back."""
    c = faithful_cluster
    c.create(JOBS, pytorchjob('sus', SLEEP, replicas=2))
    c.wait_job_condition('sus', 'Running')
    c.wait_pod_phase('sus-worker-1', 'Running')
    c.merge(JOBS, 'sus', {'spec': {'runPolicy': {'suspend': True}}})
    suspended = c.wait_job_condition('sus', 'Suspended')
    assert (suspended['reason'], suspended['message']) == ('PyTorchJobSuspended', 'PyTorchJob sus is suspended.')
    for i in (0, 1):
        c.wait_gone(PODS, f'sus-worker-{i}')
        c.wait_gone(SERVICES, f'sus-worker-{i}')
    assert conds(c, 'sus')['Running']['status'] == 'False'
    start = c.snapshot(JOBS, 'sus')['status']['startTime']
    c.merge(JOBS, 'sus', {'spec': {'runPolicy': {'suspend': False}}})
    resumed = c.wait_job_condition('sus', 'Suspended', 'False')
    assert resumed['reason'] == 'PyTorchJobResumed'
    c.wait_pod_phase('sus-worker-0', 'Running')
    c.wait_job_condition('sus', 'Running')
    assert c.snapshot(JOBS, 'sus')['status']['startTime'] >= start


def test_elastic_success_and_env(faithful_cluster):
    """UpdateJobStatus: with an elasticPolicy, one succeeded worker is success; the env is
    setPodEnv's + ElasticEnvVarGenerator's (no MASTER_ADDR/WORLD_SIZE/RANK for Worker-only jobs)."""
    c = faithful_cluster
    dump = 'env | grep -E "^(PET_|MASTER_|WORLD_SIZE|RANK|PYTHONUNBUFFERED)" | sort > /dev/termination-log'
    elastic = {'minReplicas': 1, 'maxReplicas': 2, 'rdzvBackend': 'c10d', 'rdzvId': 'rid', 'maxRestarts': 3,
               'rdzvConf': [{'key': 'join_timeout', 'value': '60'}, {'key': 'x', 'value': 'y'}]}
    job = pytorchjob('el', f'case $HOSTNAME in *-0) {dump}; exit 0;; esac; {SLEEP}', replicas=2, elastic=elastic)
    job['spec']['nprocPerNode'] = '2'
    c.create(JOBS, job)
    ok = c.wait_job_condition('el', 'Succeeded')
    assert (ok['reason'], ok['message']) == ('PyTorchJobSucceeded', 'PyTorchJob default/el successfully completed.')
    msg = c.wait_terminated('el-worker-0')['message']
    assert msg.splitlines() == sorted([
        'PET_MAX_RESTARTS=3', 'PET_NNODES=1:2', 'PET_NPROC_PER_NODE=2', 'PET_RDZV_BACKEND=c10d',
        'PET_RDZV_CONF=join_timeout=60,x=y', 'PET_RDZV_ENDPOINT=el-worker-0:23456', 'PET_RDZV_ID=rid',
        'PYTHONUNBUFFERED=1'])
    pod = c.snapshot(PODS, 'el-worker-0')
    assert pod['metadata']['labels'] == {
        'app': 'el', 'training.kubeflow.org/operator-name': 'pytorchjob-controller',
        'training.kubeflow.org/job-name': 'el', 'training.kubeflow.org/replica-type': 'worker',
        'training.kubeflow.org/replica-index': '0', 'training.kubeflow.org/job-role': 'master'}
    assert pod['metadata']['ownerReferences'][0]['controller'] is True
    assert pod['spec']['containers'][0]['ports'] == [{'name': 'pytorchjob-port', 'containerPort': 23456}]
    svc = c.get(SERVICES, 'el-worker-1')
    assert svc['spec']['clusterIP'] == 'None' and svc['spec']['ports'] == [{'name': 'pytorchjob-port', 'port': 23456}]
    assert c.get(PODS, 'el-worker-1') is not None  # cleanPodPolicy defaults to None
    rs = c.wait_for(lambda: 'active' not in c.snapshot(JOBS, 'el')['status']['replicaStatuses']['Worker']
                    and c.snapshot(JOBS, 'el')['status']['replicaStatuses']['Worker'], what='active moved to succeeded')
    assert rs['selector'] == ('training.kubeflow.org/job-name=el,training.kubeflow.org/operator-name=pytorchjob-controller,'
                              'training.kubeflow.org/replica-type=worker')
    assert rs['succeeded'] >= 1 and 'active' not in rs  # finished: ReconcileJobs moves active to succeeded


def test_env_of_master_jobs_and_rdzv_host():
    """setPodEnv with a Master; elastic rdzvHost/rdzvPort (pure functions, no cluster)."""
    job = pytorchjob('mj', 'true', replicas=2)
    job['spec']['pytorchReplicaSpecs']['Master'] = {'replicas': 1, 'template': {'spec': {'containers': [
        {'name': 'pytorch', 'image': 'x', 'ports': [{'name': 'pytorchjob-port', 'containerPort': 1234}]}]}}}
    job['spec']['nprocPerNode'] = '4'
    job['metadata']['uid'] = 'u'
    env = {e['name']: e['value'] for e in pod_env(default_job(job), 'worker', 1)}
    assert env == {'PYTHONUNBUFFERED': '1', 'MASTER_PORT': '1234', 'PET_MASTER_PORT': '1234', 'MASTER_ADDR': 'mj-master-0',
                   'PET_MASTER_ADDR': 'mj-master-0', 'WORLD_SIZE': '12', 'RANK': '2', 'PET_NODE_RANK': '2',
                   'PET_NPROC_PER_NODE': '4', 'PET_NNODES': '3'}
    el = pytorchjob('ej', 'true', replicas=3, elastic={'rdzvHost': 'store', 'rdzvPort': 29400, 'maxReplicas': 4})
    env = {e['name']: e['value'] for e in pod_env(default_job(el), 'worker', 0)}
    assert env == {'PYTHONUNBUFFERED': '1', 'PET_NPROC_PER_NODE': 'auto', 'PET_RDZV_ENDPOINT': 'store:29400',
                   'PET_RDZV_BACKEND': 'c10d', 'PET_NNODES': '4:4'}
    assert expand('$(A)-$$(A)-$(B)-$(', {'A': 'a'}) == 'a-$(A)-$(B)-$('


def test_clean_pod_policy_running(faithful_cluster):
    """DeletePodsAndServices on a finished job: Running deletes running pods, keeps succeeded ones."""
    c = faithful_cluster
    job = pytorchjob('cp', f'case $HOSTNAME in *-0) exit 0;; esac; {SLEEP}', replicas=2, elastic={},
                     run_policy={'cleanPodPolicy': 'Running'})
    c.create(JOBS, job)
    c.wait_job_condition('cp', 'Succeeded')
    c.wait_gone(PODS, 'cp-worker-1')
    c.wait_gone(SERVICES, 'cp-worker-1')
    assert c.get(PODS, 'cp-worker-0')['status']['phase'] == 'Succeeded'
    assert c.get(SERVICES, 'cp-worker-0') is not None


def test_active_deadline(faithful_cluster):
    """PastActiveDeadline, as v1.9 runs it: checked at a reconcile (its AddAfter goes to a
    FakeWorkQueue), so the deadline fails the job at the next event after it passed."""
    c = faithful_cluster
    c.create(JOBS, pytorchjob('dl', SLEEP, run_policy={'activeDeadlineSeconds': 3}))
    c.wait_job_condition('dl', 'Running')
    c.wait_pod_condition('dl-worker-0', 'Ready')
    start = c.snapshot(JOBS, 'dl')['status']['startTime']  # whole seconds, like metav1.Time
    time.sleep(max(0.0, parse_time(start).timestamp() + 3.3 - time.time()))  # past the deadline, no event
    assert 'Failed' not in conds(c, 'dl'), 'v1.9 has no timer for the deadline'
    assert c.snapshot(JOBS, 'dl')['status']['startTime'] == start
    c.merge(JOBS, 'dl', {'metadata': {'annotations': {'poke': '1'}}})  # any event reconciles
    failed = c.wait_job_condition('dl', 'Failed')
    assert failed['message'] == 'Job dl has failed because it was active longer than specified deadline'
    c.wait_gone(PODS, 'dl-worker-0')


def test_active_deadline_with_resync(tmp_path):
    """With controller-runtime's periodic resync (resync_period) the deadline fires by itself."""
    with FaithfulCluster(tmp_path / 'c', resync_period=0.3) as c:
        c.create(JOBS, pytorchjob('dr', SLEEP, run_policy={'activeDeadlineSeconds': 1}))
        c.wait_job_condition('dr', 'Failed', timeout=10)


def test_scale_down_deletes_extra_pods(faithful_cluster):
    """ReconcilePods/ReconcileServices: indexes >= replicas are deleted."""
    c = faithful_cluster
    c.create(JOBS, pytorchjob('sc', SLEEP, replicas=2))
    c.wait_pod_phase('sc-worker-1', 'Running')
    c.merge(JOBS, 'sc', {'spec': {'pytorchReplicaSpecs': {'Worker': {'replicas': 1}}}})
    c.wait_gone(PODS, 'sc-worker-1')
    c.wait_gone(SERVICES, 'sc-worker-1')
    assert c.snapshot(PODS, 'sc-worker-0')['status']['phase'] == 'Running'


def test_lose_node_pod_recreated(faithful_cluster):
    c = faithful_cluster
    c.create(JOBS, pytorchjob('ln', SLEEP))
    old = c.wait_pod_phase('ln-worker-0', 'Running')
    c.lose_node('ln-worker-0')
    assert c.get(PODS, 'ln-worker-0') is None or c.get(PODS, 'ln-worker-0')['metadata']['uid'] != old['metadata']['uid']
    new = c.wait_pod_replaced('ln-worker-0', old['metadata']['uid'])
    c.wait_for(lambda: (c.snapshot(PODS, 'ln-worker-0') or {}).get('status', {}).get('phase') == 'Running'
               and c.snapshot(PODS, 'ln-worker-0')['metadata']['uid'] == new['metadata']['uid'], what='new pod Running')


def test_rejected_job_is_not_reconciled(faithful_cluster):
    """validatePyTorchJob: no container named pytorch -> what the webhook would refuse."""
    c = faithful_cluster
    bad = pytorchjob('bad', 'true')
    bad['spec']['pytorchReplicaSpecs']['Worker']['template']['spec']['containers'][0]['name'] = 'main'
    c.create(JOBS, bad)
    c.create(JOBS, pytorchjob('good', SLEEP))
    c.wait_pod_phase('good-worker-0', 'Running')
    c.wait_for(lambda: ('default', 'bad') in c.controller.rejected, what='rejected')
    assert c.get(PODS, 'bad-worker-0') is None


# ======================================================================================= the kubelet

def test_termination_messages(faithful_cluster):
    c = faithful_cluster
    big = 'python3 -c "import sys; open(\'/var/run/msg/out\', \'w\').write(\'x\' * 5000 + \'END\')"'
    c.create(PODS, {'metadata': {'name': 'tm'}, 'spec': {'restartPolicy': 'Never', 'containers': [
        {'name': 'file', 'image': 'x', 'command': ['sh', '-c', 'echo "disk full" > /dev/termination-log; exit 2']},
        {'name': 'logs', 'image': 'x', 'terminationMessagePolicy': 'FallbackToLogsOnError',
         'command': ['sh', '-c', 'for i in $(seq 1 100); do echo line$i; done; exit 1']},
        {'name': 'custom', 'image': 'x', 'terminationMessagePath': '/var/run/msg/out', 'command': ['sh', '-c', big]}]}})
    pod = c.wait_pod_phase('tm', 'Failed')
    term = {cs['name']: cs['state']['terminated'] for cs in pod['status']['containerStatuses']}
    assert (term['file']['exitCode'], term['file']['message'], term['file']['reason']) == (2, 'disk full\n', 'Error')
    assert term['logs']['message'].splitlines() == [f'line{i}' for i in range(21, 101)]  # the last 80 lines
    assert term['custom']['exitCode'] == 0 and term['custom']['reason'] == 'Completed'
    assert len(term['custom']['message']) == 4096 and term['custom']['message'].endswith('END')
    assert not os.path.exists('/var/run/msg')  # created in the container's own mount namespace only
    assert not os.path.exists('/dev/termination-log')
    assert {(m['container'], m['exitCode']) for m in c.termination_messages} >= {('file', 2), ('logs', 1), ('custom', 0)}


def test_pods_isolated_and_reach_each_other_by_service(faithful_cluster):
    """Own netns: two pods bind the same port; they reach each other by Service name (ready
    endpoints only) and a server the test runs on cluster.host_ip."""
    c = faithful_cluster

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'host-ok')

        def log_message(self, *a: object) -> None:
            pass
    host = http.server.ThreadingHTTPServer((c.host_ip, 0), Handler)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    server = ('import http.server, socket\n'
              'class H(http.server.BaseHTTPRequestHandler):\n'
              '    def do_GET(self):\n'
              '        self.send_response(200); self.end_headers(); self.wfile.write(socket.gethostname().encode())\n'
              'http.server.HTTPServer(("0.0.0.0", 8080), H).serve_forever()\n')
    client = ('import time, urllib.request\n'
              'out = []\n'
              f'for url in ["http://b:8080/", "http://a.default.svc.cluster.local:8080/", "http://{c.host_ip}:{host.server_port}/"]:\n'
              '    deadline = time.time() + 15\n'
              '    while True:\n'
              '        try:\n'
              '            out.append(urllib.request.urlopen(url, timeout=2).read().decode()); break\n'
              '        except Exception as e:\n'
              '            if time.time() > deadline: out.append(repr(e)); break\n'
              '            time.sleep(0.1)\n'
              'open("/dev/termination-log", "w").write(",".join(out))\n')
    try:
        for name in ('a', 'b'):
            c.create(SERVICES, {'metadata': {'name': name}, 'spec': {'selector': {'app': name},
                                                                     'ports': [{'port': 8080, 'targetPort': 8080}]}})
            c.create(PODS, {'metadata': {'name': f'srv-{name}', 'labels': {'app': name}}, 'spec': {'containers': [
                {'name': 'srv', 'image': 'x', 'command': ['python3', '-c', server], 'ports': [{'containerPort': 8080}],
                 'readinessProbe': {'httpGet': {'path': '/', 'port': 8080}, 'periodSeconds': 1}}]}})
        c.create(PODS, {'metadata': {'name': 'cli'}, 'spec': {'restartPolicy': 'Never', 'containers': [
            {'name': 'cli', 'image': 'x', 'command': ['python3', '-c', client]}]}})
        pod = c.wait_pod_phase('cli', 'Succeeded', timeout=30)
        assert pod['status']['containerStatuses'][0]['state']['terminated']['message'] == 'srv-b,srv-a,host-ok'
        a, b = (c.wait_pod_condition(f'srv-{n}', 'Ready') for n in 'ab')
        assert a['status']['podIP'] != b['status']['podIP']
        assert a['status']['podIP'] != c.host_ip and b['status']['containerStatuses'][0]['ready'] is True
    finally:
        host.shutdown()
        host.server_close()


def test_restart_in_place_and_evict(faithful_cluster):
    """restartPolicy Always: kill_container restarts in place (restartCount, lastState); a
    SIGTERM to a PID 1 without a handler is ignored; eviction is graceful (SIGTERM, grace
    period, SIGKILL) and the object goes only after that."""
    c = faithful_cluster
    c.create(PODS, {'metadata': {'name': 'al'}, 'spec': {'terminationGracePeriodSeconds': 1, 'containers': [
        {'name': 'c', 'image': 'x', 'command': ['sleep', '30']}]}})
    c.wait_pod_phase('al', 'Running')
    c.kill_container('al', signal.SIGKILL)
    pod = c.wait_pod('al', lambda p: p['status']['containerStatuses'][0]['restartCount'] == 1
                     and 'running' in p['status']['containerStatuses'][0]['state'] and p)
    assert pod['status']['containerStatuses'][0]['lastState']['terminated']['exitCode'] == 137
    assert pod['status']['phase'] == 'Running'
    pid = c.kill_container('al', signal.SIGTERM)  # PID 1 has no handler: ignored
    assert psutil.pid_exists(pid)
    t0 = time.monotonic()
    c.evict('al')
    c.wait_pod('al', lambda p: p['metadata'].get('deletionTimestamp'))
    c.wait_gone(PODS, 'al')
    assert 0.9 < time.monotonic() - t0 < 10  # waited the grace period, then SIGKILL
    assert not psutil.pid_exists(pid)
    last = c.history(PODS, 'al')[-1]
    assert last['status']['phase'] == 'Failed'


def test_onfailure_crash_loop_backoff(faithful_cluster):
    c = faithful_cluster
    c.create(PODS, {'metadata': {'name': 'cl'}, 'spec': {'restartPolicy': 'OnFailure', 'containers': [
        {'name': 'c', 'image': 'x', 'command': ['sh', '-c', 'echo run; exit 1']}]}})
    pod = c.wait_pod('cl', lambda p: p['status'].get('containerStatuses', [{}])[0].get('restartCount', 0) >= 3 and p)
    assert pod['status']['phase'] == 'Running'
    states = [p['status']['containerStatuses'][0]['state'] for p in c.history(PODS, 'cl') if p.get('status', {}).get('containerStatuses')]
    assert any(s.get('waiting', {}).get('reason') == 'CrashLoopBackOff' for s in states)
    assert c.logs('cl', previous=True) == 'run\n'


def test_deployment_gc_secret_env_and_volumes(faithful_cluster):
    c = faithful_cluster
    c.create(SECRETS := 'v1/secrets', {'metadata': {'name': 'creds'}, 'stringData': {'TOKEN': 'abc'}})
    c.create('v1/configmaps', {'metadata': {'name': 'cfg'}, 'data': {'conf.yaml': 'x: 1\n'}})
    template = {'metadata': {'labels': {'app': 'web'}}, 'spec': {'terminationGracePeriodSeconds': 1, 'containers': [{
        'name': 'web', 'image': 'x', 'command': ['sh', '-c', f'echo token=$TOKEN pod=$(POD); cat /etc/cfg/conf.yaml; {SLEEP}'],
        'env': [{'name': 'TOKEN', 'valueFrom': {'secretKeyRef': {'name': 'creds', 'key': 'TOKEN'}}},
                {'name': 'POD', 'valueFrom': {'fieldRef': {'fieldPath': 'metadata.name'}}}],
        'volumeMounts': [{'name': 'cfg', 'mountPath': '/etc/cfg'}],
        'readinessProbe': {'exec': {'command': ['test', '-f', '/etc/cfg/conf.yaml']}, 'periodSeconds': 1}}],
        'volumes': [{'name': 'cfg', 'configMap': {'name': 'cfg'}}]}}
    c.create(DEPLOYMENTS, {'metadata': {'name': 'web'}, 'spec': {
        'replicas': 1, 'strategy': {'type': 'Recreate'}, 'selector': {'matchLabels': {'app': 'web'}}, 'template': template}})
    c.wait_for(lambda: (c.snapshot(DEPLOYMENTS, 'web') or {}).get('status', {}).get('readyReplicas') == 1, what='ready')
    first = c.snapshots(PODS, app='web')[0]['metadata']['name']
    assert c.logs(first) == f'token=abc pod={first}\nx: 1\n'
    assert not os.path.exists('/etc/cfg')
    c.delete(PODS, first)  # a deleted pod is replaced
    c.wait_for(lambda: [p for p in c.snapshots(PODS, app='web') if p['metadata']['name'] != first
                        and p['status']['phase'] == 'Running'], what='replacement')
    c.delete(DEPLOYMENTS, 'web')  # the GC deletes the pods it owned
    c.wait_for(lambda: not c.snapshots(PODS, app='web'), what='pods collected')
    assert c.get(SECRETS, 'creds') is not None


def test_stale_network_of_dead_process_is_cleaned():
    """A netns/bridge named after a pid that no longer exists is removed."""
    import subprocess
    proc = subprocess.Popen(['true'])
    proc.wait()
    dead = proc.pid
    ns, br = f'fc-{dead}-1', f'fcb{dead:x}x1'
    subprocess.run(['ip', 'netns', 'add', ns], check=True)
    subprocess.run(['ip', 'link', 'add', br, 'type', 'bridge'], check=True)
    removed = cleanup_stale_network()
    assert ns in removed and br in removed
    assert ns not in subprocess.run(['ip', 'netns', 'list'], capture_output=True, text=True).stdout
