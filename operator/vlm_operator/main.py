"""`vlmpretrain operator`: run the operator (same as `kopf run -m vlm_operator.handlers`;
its arguments are defined in vlm_api/cli.py).

Connection: like kubectl — in-cluster service account when running in a pod, else
`$KUBECONFIG` / `~/.kube/config` (current context). kopf and the operator's own client
(`kube.py`) both log in that way.

One replica, `Recreate`
-----------------------
The operator is deployed as exactly one replica with the `Recreate` strategy (see
`manifests/operator/deployment.yaml`), and runs kopf in `--standalone` mode (no peering
objects, no peering RBAC). Reasons:

- correctness: status is written by one process only, so its in-memory status is
  authoritative (registry.py) and a run's reconciles are serialised by an in-process lock;
  two replicas would race (both would act on the same job failure);
- `Recreate` (not `RollingUpdate`) guarantees the old pod is gone before the new one
  starts, so there is no overlap during rollouts;
- restarts are safe by construction: child names are deterministic, a create that finds
  its object (409) adopts it, and the pipeline state lives in the run's status, so a new
  process resumes exactly where the old one stopped, without duplicates.

kopf's peering (`--peering NAME`, with the kopf.dev peering CRDs and RBAC installed) is
available for active/standby setups where a brief dual run on rollout is unacceptable.

Logs are structured: `--log-format json` (default) emits one JSON object per line with
the run as `object` ({namespace, name}); `--log-format plain` prefixes `[ns/name]`.
"""

from __future__ import annotations

import argparse
import os


def run(args: argparse.Namespace) -> int:
    import kopf

    if getattr(args, "metrics_port", None) is not None:
        os.environ["VLM_OPERATOR_METRICS_PORT"] = str(args.metrics_port)
    fmt = {"json": kopf.LogFormat.JSON, "plain": kopf.LogFormat.PLAIN, "full": kopf.LogFormat.FULL}[args.log_format]
    kopf.configure(verbose=args.verbose, log_format=fmt, log_prefix=args.log_format != "json",
                   log_refkey="object" if args.log_format == "json" else None)

    from . import handlers  # noqa: F401  (registers the handlers)

    namespaces = list(args.namespace or [])
    kopf.run(
        standalone=not args.peering,
        peering_name=args.peering,
        namespaces=namespaces,
        clusterwide=not namespaces,
        liveness_endpoint=args.liveness,
    )
    return 0

