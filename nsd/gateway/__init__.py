"""`nsd gateway`: REST, Server-Sent Events, gRPC and a web view in front of the broker.

A thin process that is one more client of the broker (nsd.client.api.AsyncClient): it holds no task
state of its own, never imports torch, and needs `pip install 'nsd[gateway]'`.
"""
