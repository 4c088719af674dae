"""Ports on 127.0.0.1 for the servers and coordinators tests start: the only address they use."""

import socket


def free_port() -> int:
  """A port no process listens on now (the kernel's pick)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]
