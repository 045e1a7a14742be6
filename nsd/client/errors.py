"""What a client call raises when the broker cannot or will not answer."""


class BrokerUnavailable(ConnectionError):
    """No answer from the broker in time."""


class BrokerRefused(BrokerUnavailable):
    """The broker refused this client's connection at the handshake: its CURVE key is not allowed there,
    or the two sides do not agree on CURVE. The message says which and what to do."""


class BrokerError(RuntimeError):
    """The broker answered with an error (bad spec, unknown task, ...)."""


class NotActive(BrokerError):
    """The passive broker of a pair answered: ask the other one."""


class ReplyTooLarge(BrokerError):
    """The broker answered, but with a message over this client's MAXMSGSIZE: ZeroMQ drops such a
    message and closes the connection, so without this the request would end as BrokerUnavailable."""

