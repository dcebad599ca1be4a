"""A faithful local imitation of TextLocal's SMS HTTP API, for the demo, tests and staging.

Run it with `python -m consumer.sandbox --port 8080 --api-key KEY`, or in-process with
`running_sandbox(...)`. Where TextLocal's published API is silent the sandbox assumes, and says
so in ASSUMPTIONS.md beside this file.
"""

from __future__ import annotations

from consumer.sandbox.admin_client import (
    Balance,
    BatchInfo,
    GroupView,
    LoggedCall,
    LoggedMessage,
    SandboxAdminClient,
    SandboxAdminError,
)
from consumer.sandbox.config import SandboxConfig
from consumer.sandbox.contacts import Contact
from consumer.sandbox.delivery import DeliveryMix, DeliveryModel
from consumer.sandbox.demo import seed_demo
from consumer.sandbox.faults import FaultRule
from consumer.sandbox.server import SandboxHandle, running_sandbox
from consumer.sandbox.state import SandboxState

__all__ = [
    "Balance",
    "BatchInfo",
    "Contact",
    "DeliveryMix",
    "DeliveryModel",
    "FaultRule",
    "GroupView",
    "LoggedCall",
    "LoggedMessage",
    "SandboxAdminClient",
    "SandboxAdminError",
    "SandboxConfig",
    "SandboxHandle",
    "SandboxState",
    "running_sandbox",
    "seed_demo",
]
