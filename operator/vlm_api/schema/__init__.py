"""The VLMPretrainRun spec and status: the single source of truth.

The CRD's OpenAPI schema (`vlm_api.crd`), `vlmpretrain validate`, the rendered trainer
config and the trainer itself all come from these models. Field names are the API
contract (README, "The API"): add fields freely, rename none.

Cross-field rules live twice on purpose: as CEL (`x-kubernetes-validations`, enforced by
the API server at admission) and as Python validators (the same rules for `validate`,
the operator and the trainer, which cannot assume the CRD is installed).

The package's modules: `common` (names, patterns, helpers), `model`, `data`, `stages`,
`infra` (resources, parallelism, elastic, checkpoint, metrics) and `run` (the spec, status
and trainer config). Everything is re-exported here: `from vlm_api import schema as s; s.Stage`.
"""

from .common import *  # noqa: F401,F403
from .data import *  # noqa: F401,F403
from .infra import *  # noqa: F401,F403
from .model import *  # noqa: F401,F403
from .run import *  # noqa: F401,F403
from .stages import *  # noqa: F401,F403
