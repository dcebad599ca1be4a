"""A faithful local imitation of TextLocal's SMS HTTP API, for the demo, tests and staging.

Its own distribution (`textlocal-sandbox`, in `sandbox/` of the daemon's repository), depending on
aiohttp only: never installed in the daemon's image. Run it with
`textlocal-sandbox --port 8080 --api-key KEY` (or `python -m textlocal_sandbox ...`), or in-process
with `running_sandbox(...)`. Where TextLocal's published API is silent the sandbox assumes, and
says so in ASSUMPTIONS.md beside this file.
"""

from __future__ import annotations

from textlocal_sandbox.admin_client import (
    Balance,
    BatchInfo,
    GroupView,
    LoggedCall,
    LoggedMessage,
    SandboxAdminClient,
    SandboxAdminError,
)
from textlocal_sandbox.clock import ManualClock
from textlocal_sandbox.config import SandboxConfig
from textlocal_sandbox.contacts import Contact
from textlocal_sandbox.delivery import DeliveryMix, DeliveryModel
from textlocal_sandbox.demo import seed_demo
from textlocal_sandbox.faults import FaultRule
from textlocal_sandbox.server import SandboxHandle, running_sandbox
from textlocal_sandbox.state import SandboxState

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
    "ManualClock",
    "SandboxAdminClient",
    "SandboxAdminError",
    "SandboxConfig",
    "SandboxHandle",
    "SandboxState",
    "running_sandbox",
    "seed_demo",
]
