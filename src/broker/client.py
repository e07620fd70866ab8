"""The documented import path of the agent client: ``from broker.client import AgentSession``.

The client lives in :mod:`broker.agent.client`, beside the rest of what agents use; this module
only re-exports its public names so that code written against ``broker.client`` keeps working,
with no deprecation warning (it is a supported alias, see docs/agents.md).
"""

from __future__ import annotations

# Exactly the public names of broker.agent.client (its __all__), so the two cannot drift.
from broker.agent.client import *  # noqa: F403
from broker.agent.client import __all__ as __all__
