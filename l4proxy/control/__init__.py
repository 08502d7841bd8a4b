"""The control plane: enrollment, the CA bundle, identity-checked endpoints, ops."""

from ._api import ControlApi, Readiness
from ._server import ControlAddresses, ControlPlaneError, control_ssl_context, run_control_plane

__all__ = [
    "ControlAddresses",
    "ControlApi",
    "ControlPlaneError",
    "Readiness",
    "control_ssl_context",
    "run_control_plane",
]
