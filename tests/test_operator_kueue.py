"""A Kueue-managed run against the real operator over the API emulator; the test plays Kueue.

What Kueue does to a PyTorchJob (kubernetes-sigs/kueue, pkg/controller/jobframework/
reconciler.go, ReconcileGenericJob, and pkg/controller/jobs/kubeflow/kubeflowjob/
kubeflowjob_controller.go):
- it makes a Workload labelled kueue.x-k8s.io/job-uid (ConstructWorkload);
- on admission it un-suspends the job (step 7: startJob -> KubeflowJob.RunWithPodSetsInfo,
  runPolicy.suspend = false, merging the flavour's nodeSelectors into the pod templates);
- on eviction or preemption, or when the Workload's spec.active is false, it suspends the
  job again (step 6: stopJob -> KubeflowJob.Suspend) and restores the templates;
- a job un-suspended without admission is suspended again (step 8), and a suspended job
  whose Workload is admitted is un-suspended (step 7): so runPolicy.suspend is Kueue's alone.
"""

from __future__ import annotations

import pytest

from tests.support.kube_emulator import resource_info
from tests.support.operator_harness import Cluster, spec, wait

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:HTTPResponse.getheaders:DeprecationWarning")]

WORKLOADS = "kueue.x-k8s.io/v1beta1/workloads"
JOB = "team-pretrain"


def suspended(cluster: Cluster) -> bool:
    return cluster.job(JOB)["spec"]["runPolicy"]["suspend"]


def kueue_admits(cluster: Cluster) -> None:
    cluster.merge("kubeflow.org/v1/pytorchjobs", JOB, {"spec": {"runPolicy": {"suspend": False}}})
    cluster.set_job(JOB, "Running")


def kueue_evicts(cluster: Cluster) -> None:
    cluster.merge("kubeflow.org/v1/pytorchjobs", JOB, {"spec": {"runPolicy": {"suspend": True}}})
    cluster.set_job(JOB, "Suspended", "PyTorchJobSuspended")


def settled(cluster: Cluster, generation: int) -> dict:
    """The status once the operator has acted on `generation` (and a resync after it)."""
    return wait(lambda: cluster.status("team").get("observedGeneration") == generation and cluster.status("team"),
                what=f"generation {generation} observed")


def test_kueue_holds_the_job_the_operator_never_unsuspends_it_and_suspend_goes_to_the_workload(cluster):
    cluster.kube.add_resource(WORKLOADS, resource_info("Workload"))
    with cluster.operator():
        cluster.create_run("team", spec(scheduling={"queueName": "team-a"}))
        job = wait(lambda: cluster.job(JOB), what="job")
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
        assert suspended(cluster) is True
        cluster.set_job(JOB, "Suspended", "PyTorchJobSuspended")  # the controller reports it suspended
        wait(lambda: cluster.condition("team", "Ready").get("reason") == "QueuedByKueue", what="QueuedByKueue")
        assert cluster.status("team")["phase"] == "Pending"
        assert "team-a" in cluster.condition("team", "Ready")["message"]

        # A day-2 change is reconciled, and the job stays held: only Kueue admits it.
        cluster.patch_spec("team", {"checkpoint": {"keep": 5}})
        settled(cluster, 2)
        assert suspended(cluster) is True

        cluster.create("kueue.x-k8s.io/v1beta1/workloads", {
            "apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "Workload",
            "metadata": {"name": f"pytorchjob-{JOB}-1a2b3", "labels": {"kueue.x-k8s.io/job-uid": job["metadata"]["uid"]}},
            "spec": {"queueName": "team-a", "podSets": []}})
        kueue_admits(cluster)
        cluster.wait_phase("team", "Running")

        # spec.suspend on top: the operator deactivates the Workload, Kueue evicts the job.
        cluster.patch_spec("team", {"suspend": True})
        wait(lambda: cluster.get(WORKLOADS, f"pytorchjob-{JOB}-1a2b3")["spec"].get("active") is False,
             what="workload deactivated")
        cluster.wait_phase("team", "Suspended")
        assert suspended(cluster) is False  # the operator left the job to Kueue
        kueue_evicts(cluster)
        assert cluster.status("team")["phase"] == "Suspended"

        # Resume: the Workload is active again; the job waits for Kueue's admission.
        cluster.patch_spec("team", {"suspend": False})
        wait(lambda: cluster.get(WORKLOADS, f"pytorchjob-{JOB}-1a2b3")["spec"]["active"] is True,
             what="workload reactivated")
        wait(lambda: cluster.condition("team", "Ready").get("reason") == "QueuedByKueue", what="queued again")
        settled(cluster, 4)
        assert suspended(cluster) is True
        kueue_admits(cluster)
        cluster.wait_phase("team", "Running")
        cluster.wait_events("team", "Suspended", "Resumed")
    assert cluster.job(JOB)["metadata"]["uid"] == job["metadata"]["uid"]  # the same job throughout


def test_without_kueue_installed_a_queued_run_still_reports_why_it_waits(cluster):
    with cluster.operator():
        cluster.create_run("team", spec(scheduling={"queueName": "team-a"}, suspend=True))
        cluster.wait_phase("team", "Suspended")
        cluster.patch_spec("team", {"suspend": False})
        wait(lambda: cluster.condition("team", "Ready").get("reason") == "QueuedByKueue", what="queued")
        settled(cluster, 2)
    assert suspended(cluster) is True
