"""The test emulator itself, over real HTTP with the official client, and a real kopf against it."""
import json
import subprocess
import threading
import time
import urllib.request

import kopf
import kubernetes
import pytest
from kopf.testing import KopfRunner
from kubernetes.client import ApiException

from tests.support.kube_emulator import ApiRequest, kube, resource_info  # noqa: F401 (kube is a fixture)

NS = 'ns1'
VPR = ('pretrain.vlm.dev', 'v1alpha1', NS, 'vlmpretrainruns')


def wait_for(condition, timeout=5.0, interval=0.01):
    """Poll a condition with a deadline (there is no event to await across threads and processes)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result or time.monotonic() > deadline:
            assert result, 'condition not met in time'
            return result
        time.sleep(interval)


@pytest.fixture
def api(kube):
    with kube.api_client() as client:
        yield client


@pytest.fixture
def core(api):
    return kubernetes.client.CoreV1Api(api)


@pytest.fixture
def crs(api):
    return kubernetes.client.CustomObjectsApi(api)


def cm(name, **labels):
    return {'metadata': {'name': name, 'labels': labels}, 'data': {'k': name}}


def vpr(name, **spec):
    return {'apiVersion': 'pretrain.vlm.dev/v1alpha1', 'kind': 'VLMPretrainRun',
            'metadata': {'name': name}, 'spec': spec or {'image': 'x'}, 'status': {'phase': 'Forged'}}


def test_create_assigns_identity_and_versions(core):
    a = core.create_namespaced_config_map(NS, cm('a'))  # the client maps only 201 to a body
    b = core.create_namespaced_config_map(NS, cm('b'))
    assert a.metadata.uid and a.metadata.uid != b.metadata.uid
    assert a.metadata.creation_timestamp is not None and a.metadata.generation == 1
    assert int(b.metadata.resource_version) > int(a.metadata.resource_version)
    patched = core.patch_namespaced_config_map('a', NS, {'data': {'k': 'new'}})
    assert int(patched.metadata.resource_version) > int(b.metadata.resource_version)
    assert patched.metadata.uid == a.metadata.uid and patched.metadata.name == 'a'
    again = core.patch_namespaced_config_map('a', NS, {'data': {'k': 'new'}})  # a no-op write
    assert again.metadata.resource_version == patched.metadata.resource_version


def test_duplicate_create_is_409_already_exists(core):
    core.create_namespaced_config_map(NS, cm('a'))
    with pytest.raises(ApiException) as err:
        core.create_namespaced_config_map(NS, cm('a'))
    assert err.value.status == 409
    assert '"reason": "AlreadyExists"' in err.value.body


def test_missing_object_is_404_not_found(core):
    with pytest.raises(ApiException) as err:
        core.read_namespaced_config_map('nope', NS)
    assert err.value.status == 404 and '"reason": "NotFound"' in err.value.body


def test_json_patch_test_op_mismatch_is_422_and_changes_nothing(core, kube):
    created = core.create_namespaced_config_map(NS, cm('a'))
    stale = [{'op': 'test', 'path': '/metadata/resourceVersion', 'value': '999'},
             {'op': 'add', 'path': '/metadata/finalizers', 'value': ['x/y']}]
    with pytest.raises(ApiException) as err:
        core.patch_namespaced_config_map('a', NS, stale, _content_type='application/json-patch+json')
    assert err.value.status == 422
    assert kube.get('v1/configmaps', NS, 'a')['metadata']['resourceVersion'] == created.metadata.resource_version
    fresh = [dict(stale[0], value=created.metadata.resource_version), stale[1]]
    ok = core.patch_namespaced_config_map('a', NS, fresh, _content_type='application/json-patch+json')
    assert ok.metadata.finalizers == ['x/y']


def test_merge_patch_and_put_with_optimistic_locking(core):
    created = core.create_namespaced_config_map(NS, cm('a'))
    core.patch_namespaced_config_map('a', NS, {'data': {'k': None, 'j': '1'}},
                                     _content_type='application/merge-patch+json')
    body = core.read_namespaced_config_map('a', NS)
    assert body.data == {'j': '1'}
    body.data = {'replaced': 'yes'}
    assert core.replace_namespaced_config_map('a', NS, body).data == {'replaced': 'yes'}
    body.metadata.resource_version = created.metadata.resource_version  # stale
    with pytest.raises(ApiException) as err:
        core.replace_namespaced_config_map('a', NS, body)
    assert err.value.status == 409


def test_status_subresource_split(crs):
    created = crs.create_namespaced_custom_object(*VPR, vpr('r', image='a'))
    assert 'status' not in created  # only /status writes status
    main = crs.patch_namespaced_custom_object(*VPR, 'r', {'spec': {'image': 'b'}, 'status': {'phase': 'X'}})
    assert main['spec']['image'] == 'b' and 'status' not in main
    assert main['metadata']['generation'] == 2
    status = crs.patch_namespaced_custom_object_status(*VPR, 'r', {'spec': {'image': 'c'},
                                                                   'status': {'phase': 'Running'}})
    assert status['spec']['image'] == 'b' and status['status'] == {'phase': 'Running'}
    assert status['metadata']['generation'] == 2  # status changes do not bump the generation
    assert int(status['metadata']['resourceVersion']) > int(main['metadata']['resourceVersion'])


def test_watch_from_resource_version_replays_only_newer(core):
    core.create_namespaced_config_map(NS, cm('old'))
    rv = core.list_namespaced_config_map(NS).metadata.resource_version
    core.create_namespaced_config_map(NS, cm('new'))
    core.delete_namespaced_config_map('old', NS)
    events = [(e['type'], e['object'].metadata.name) for e in kubernetes.watch.Watch().stream(
        core.list_namespaced_config_map, NS, resource_version=rv, timeout_seconds=1)]
    assert events == [('ADDED', 'new'), ('DELETED', 'old')]


def test_nothing_is_lost_between_list_and_watch(core, kube):
    names = {f'cm{i}' for i in range(40)}
    writer = threading.Thread(target=lambda: [core.create_namespaced_config_map(NS, cm(n)) for n in sorted(names)])
    writer.start()
    wait_for(lambda: kube.get('v1/configmaps', NS, 'cm1'))  # list in the middle of the writes
    listed = core.list_namespaced_config_map(NS)
    seen = {i.metadata.name for i in listed.items}
    watch = kubernetes.watch.Watch()
    stream = watch.stream(core.list_namespaced_config_map, NS,
                          resource_version=listed.metadata.resource_version, timeout_seconds=5)
    for event in stream:  # stops as soon as everything is accounted for
        assert event['type'] == 'ADDED' and event['object'].metadata.name not in seen  # no duplicates
        seen.add(event['object'].metadata.name)
        if seen == names:
            watch.stop()
    writer.join()
    assert seen == names and listed.items  # whatever the interleaving, each object exactly once


def test_generate_name(core):
    a = core.create_namespaced_config_map(NS, {'metadata': {'generateName': 'ev-'}})
    b = core.create_namespaced_config_map(NS, {'metadata': {'generateName': 'ev-'}})
    assert a.metadata.name.startswith('ev-') and len(a.metadata.name) == 8 and a.metadata.name != b.metadata.name


def test_injected_faults_fail_before_commit(core, kube):
    kube.fail('create', 'configmaps', 500)
    with pytest.raises(ApiException) as err:
        core.create_namespaced_config_map(NS, cm('a'))
    assert err.value.status == 500
    assert kube.get('v1/configmaps', NS, 'a') is None  # NOT stored
    core.create_namespaced_config_map(NS, cm('a'))  # only the next one failed

    kube.fail('patch', 'v1/configmaps', 429, retry_after=3, times=2)
    for _ in range(2):
        with pytest.raises(ApiException) as err:
            core.patch_namespaced_config_map('a', NS, {'data': {'k': 'z'}})
        assert err.value.status == 429 and err.value.headers['Retry-After'] == '3'
    assert kube.get('v1/configmaps', NS, 'a')['data'] == {'k': 'a'}
    kube.fail('watch', 'configmaps', 410)  # "resourceVersion too old" arrives in the stream, as in a cluster
    with urllib.request.urlopen(f'{kube.url}/api/v1/namespaces/{NS}/configmaps?watch=true') as response:
        event = json.loads(response.readline())
    assert response.status == 200 and event['type'] == 'ERROR' and event['object']['code'] == 410
    kube.fail('*', 'kubeflow.org/v1/pytorchjobs', 409)
    with pytest.raises(ApiException) as err:
        kubernetes.client.CustomObjectsApi(core.api_client).create_namespaced_custom_object(
            'kubeflow.org', 'v1', NS, 'pytorchjobs', {'metadata': {'name': 'j'}})
    assert err.value.status == 409 and '"reason": "AlreadyExists"' in err.value.body


def test_label_selectors(core):
    core.create_namespaced_config_map(NS, cm('a', job='j1', role='worker'))
    core.create_namespaced_config_map(NS, cm('b', job='j2', role='worker'))
    core.create_namespaced_config_map(NS, cm('c', role='master'))
    names = lambda sel: sorted(i.metadata.name for i in core.list_namespaced_config_map(NS, label_selector=sel).items)
    assert names('job=j1') == ['a']
    assert names('role=worker,job!=j1') == ['b']
    assert names('job') == ['a', 'b'] and names('!job') == ['c']
    assert names('job in (j1, j2),role notin (master)') == ['a', 'b']
    events = kubernetes.watch.Watch().stream(core.list_namespaced_config_map, NS, label_selector='job=j2',
                                             resource_version='0', timeout_seconds=1)
    assert [e['object'].metadata.name for e in events] == ['b']


def test_request_log_for_rbac(core, crs, kube):
    core.create_namespaced_config_map(NS, cm('a'))
    crs.create_namespaced_custom_object(*VPR, vpr('r'))
    crs.patch_namespaced_custom_object_status(*VPR, 'r', {'status': {'phase': 'Running'}})
    core.list_config_map_for_all_namespaces()
    assert kube.request_log == [
        ApiRequest('create', '', 'v1', 'configmaps', None, NS, None),
        ApiRequest('create', 'pretrain.vlm.dev', 'v1alpha1', 'vlmpretrainruns', None, NS, None),
        ApiRequest('patch', 'pretrain.vlm.dev', 'v1alpha1', 'vlmpretrainruns', 'status', NS, 'r'),
        ApiRequest('list', '', 'v1', 'configmaps', None, None, None),
    ]


def test_discovery_add_and_remove_at_runtime(api, crs, kube):
    apis = kubernetes.client.CustomObjectsApi(api)
    crds = lambda: {i['metadata']['name'] for i in apis.list_cluster_custom_object(
        'apiextensions.k8s.io', 'v1', 'customresourcedefinitions')['items']}
    assert 'pytorchjobs.kubeflow.org' in crds()  # installed CRDs are stored objects too
    kube.remove_resource('kubeflow.org/v1/pytorchjobs')
    assert 'pytorchjobs.kubeflow.org' not in crds()
    groups = {g.name for g in kubernetes.client.ApisApi(api).get_api_versions().groups}
    assert 'kubeflow.org' not in groups and 'pretrain.vlm.dev' in groups
    with pytest.raises(ApiException) as err:
        crs.list_namespaced_custom_object('kubeflow.org', 'v1', NS, 'pytorchjobs')
    assert err.value.status == 404

    kube.add_resource('kubeflow.org/v1/pytorchjobs', resource_info('PyTorchJob', subresources={'status'}))
    resources = kubernetes.client.CustomObjectsApi(api).get_api_resources('kubeflow.org', 'v1').resources
    assert {r.name for r in resources} == {'pytorchjobs', 'pytorchjobs/status'}
    assert crs.list_namespaced_custom_object('kubeflow.org', 'v1', NS, 'pytorchjobs')['items'] == []
    assert 'pytorchjobs.kubeflow.org' in crds()
    kube.remove_resource('kubeflow.org/v1/pytorchjobs')
    assert 'pytorchjobs.kubeflow.org' not in crds()


def test_namespaces_and_kubeconfig(kube, tmp_path):
    path = kube.write_kubeconfig(tmp_path / 'kubeconfig')
    with kubernetes.config.new_client_from_config(config_file=str(path)) as client:
        core = kubernetes.client.CoreV1Api(client)
        core.create_namespace({'metadata': {'name': 'team-a'}})  # kmock alone crashes on this URL
        assert core.read_namespace('team-a').metadata.uid
        core.create_namespaced_config_map('default', cm('a'))
    out = subprocess.run(['kubectl', '--kubeconfig', str(path), 'get', 'configmaps', '-o', 'name'],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0 and out.stdout.strip() == 'configmap/a', out.stderr


def test_kopf_finalizer_and_create_handler_cycle(kube, crs, core, monkeypatch):
    from tests.support import echo_operator
    monkeypatch.setenv('ECHO_OPERATOR_SERVER', kube.url)
    default_registry = kopf.get_default_registry()  # KopfRunner(registry=...) replaces the global one
    try:
        with KopfRunner(['run', '--standalone', '-A', '-m', 'tests.support.echo_operator'],
                        registry=echo_operator.registry, timeout=10) as runner:
            crs.create_namespaced_custom_object(*VPR, vpr('r', image='img'))
            body = wait_for(lambda: (b := kube.get('pretrain.vlm.dev/v1alpha1/vlmpretrainruns', NS, 'r'))
                            and b.get('status', {}).get('phase') == 'Echoed' and b)
            assert body['status']['echo'] == {'image': 'img'} and body['metadata']['finalizers']
            crs.delete_namespaced_custom_object(*VPR, 'r')
            wait_for(lambda: kube.get('pretrain.vlm.dev/v1alpha1/vlmpretrainruns', NS, 'r') is None)
            wait_for(lambda: core.list_namespaced_event(NS).items)  # kopf's events use generateName
    finally:
        kopf.set_default_registry(default_registry)
    assert runner.exit_code == 0, runner.output
    log = kube.request_log
    assert ApiRequest('patch', 'pretrain.vlm.dev', 'v1alpha1', 'vlmpretrainruns', 'status', NS, 'r') in log
    history = kube.call(lambda: [v and v.raw['metadata'] for v in kube.emulator.objects[
        'pretrain.vlm.dev/v1alpha1/vlmpretrainruns', NS, 'r'].history])
    assert any(m and m.get('finalizers') and m.get('deletionTimestamp') for m in history)  # graceful deletion
    assert history[-1] is None  # released by kopf's finalizer removal


def test_kubectl_get_prints_the_crd_s_columns(kube, tmp_path):
    """Server-side printing as the API server does it for CRDs: `kubectl get vlmrun` shows the
    additionalPrinterColumns of the applied CRD, filled from the object's status."""
    import subprocess
    from pathlib import Path

    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    env = {**__import__("os").environ, "KUBECONFIG": str(kubeconfig)}
    crd = Path(__file__).resolve().parents[1] / "crds" / "pretrain.vlm.dev_vlmpretrainruns.yaml"
    subprocess.run(["kubectl", "apply", "--validate=false", "-f", str(crd)], env=env, check=True, capture_output=True)
    with kube.api_client() as api:
        custom = kubernetes.client.CustomObjectsApi(api)
        custom.create_namespaced_custom_object("pretrain.vlm.dev", "v1alpha1", "default", "vlmpretrainruns", {
            "apiVersion": "pretrain.vlm.dev/v1alpha1", "kind": "VLMPretrainRun", "metadata": {"name": "r"}, "spec": {}})
        custom.patch_namespaced_custom_object_status("pretrain.vlm.dev", "v1alpha1", "default", "vlmpretrainruns", "r", {
            "status": {"phase": "Running", "stage": "pretrain", "step": 120, "loss": 2.5, "nodes": 2,
                       "lastCheckpoint": {"uri": "s3://b/r/pretrain/step-000000100/", "step": 100}}})
    out = subprocess.run(["kubectl", "get", "vlmrun"], env=env, check=True, capture_output=True, text=True).stdout
    header, row = out.splitlines()
    assert header.split() == ["NAME", "PHASE", "STAGE", "STEP", "LOSS", "CHECKPOINT", "NODES", "AGE"]
    assert row.split()[:7] == ["r", "Running", "pretrain", "120", "2.5", "100", "2"]
