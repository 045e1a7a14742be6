"""The thin client: `Client` (blocking) and `AsyncClient` (asyncio). No torch."""

from nsd.client.api import AsyncClient
from nsd.client.errors import BrokerError, BrokerRefused, BrokerUnavailable, ReplyTooLarge
from nsd.client.specs import read_spec
from nsd.client.sync import Client

__all__ = ["AsyncClient", "BrokerError", "BrokerRefused", "BrokerUnavailable", "Client", "ReplyTooLarge", "read_spec"]
