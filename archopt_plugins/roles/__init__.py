"""model → roles: what each trainable parameter is, and how it looks as matrices."""

from .detect import detect_roles
from .types import ROLES, ParamRole, ParamStructure, QKVSplit, RoleMap

__all__ = ["detect_roles", "ROLES", "ParamRole", "ParamStructure", "QKVSplit", "RoleMap"]
