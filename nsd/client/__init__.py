"""The thin client: `Client` (blocking) and `AsyncClient` (asyncio). No torch."""

from nsd.client.api import AsyncClient, BrokerError, BrokerUnavailable, Client, ReplyTooLarge, read_spec

__all__ = ["AsyncClient", "BrokerError", "BrokerUnavailable", "Client", "ReplyTooLarge", "read_spec"]
