"""Running extraction on a Ray cluster: workers that each hold the model, shards merged exactly.

:class:`RayExecutor` starts ``workers`` Ray actors that each load the model once
(:class:`ModelSpec`, i.e. :func:`lens_roles.runtime.models.load_model` with the
driver's name, device, dtype and ``n_devices``). Pass it as ``executor=`` to
:func:`~lens_roles.runtime.activations.collect`, ``collect_sets`` or the direction
builders (``role_vectors``, ``persona_vector``, ...): the forward passes run as
identified shards on the workers and the driver merges float64 sums and counts
(and per-prompt rows, in prompt order), so the result equals the single-process
one. :class:`LocalCluster` is a throw-away cluster on this machine that starts on
loaded cores (tests, benchmarks). Needs the optional extra ``pip install 'lens-roles[distributed]'``.
"""

from lens_roles.distributed.cluster import LocalCluster
from lens_roles.distributed.executor import ModelSpec, RayExecutor, check_address

__all__ = ["LocalCluster", "ModelSpec", "RayExecutor", "check_address"]
