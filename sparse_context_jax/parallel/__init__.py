"""Parallelism: the device mesh (axes data, fsdp, tensor) and the logical-axis rules that place every parameter."""

from sparse_context_jax.parallel.mesh import AXES, batch_sharding, make_mesh, mesh_shape, replicated
from sparse_context_jax.parallel.rules import DEFAULT_RULES, param_sharding, param_shardings

__all__ = ["AXES", "DEFAULT_RULES", "batch_sharding", "make_mesh", "mesh_shape", "param_sharding",
           "param_shardings", "replicated"]
