"""When a trace's requests reach the server: an open loop (a Poisson trace) or a closed loop.

* Open loop (`clients=None`): each request arrives at its own `arrival_s`, whatever the server
  does. A rate below the server's capacity is served as it comes, so there every policy's
  throughput is the offered load and the policies part only in latency.
* Closed loop (`clients=C`): at most C requests are in flight. The first C are sent at time 0,
  and whenever one is done the next unsent request of the trace (in trace order) is sent, as a
  benchmark with a cap on concurrent requests loads a server (vLLM's `--max-concurrency`).
  Throughput then follows the server's speed at every load: with C = 1 it is one user's decode
  speed, the load at which speculation should pay most.

The serving loops (`paxlike.serving`) take requests from `Arrivals` and report each one's finish.
"""

from __future__ import annotations

import collections


class Arrivals:
  """The requests of a trace not yet taken, in arrival order, and each request's arrival time
  (seconds after the trace starts)."""

  def __init__(self, requests: list, clients: int | None = None):
    if clients is not None and clients < 1:
      raise ValueError(f"clients={clients}: a closed loop needs at least one client")
    sent = requests if clients is None else requests[:clients]
    self.arrival = {id(r): r.arrival_s if clients is None else 0.0 for r in sent}
    self.ready = collections.deque(sent)  # sent, not yet taken
    self.unsent = collections.deque(() if clients is None else requests[clients:])

  def __bool__(self) -> bool:
    """Whether a sent request waits to be taken (arrived or not yet). In a closed loop the
    unsent requests are not counted: they are sent only as requests in flight finish."""
    return bool(self.ready)

  def next_arrival(self) -> float:
    """The arrival time of the next request to be taken."""
    return self.arrival[id(self.ready[0])]

  def take(self, now: float):
    """The next request if it has arrived by `now`, else None."""
    if self.ready and self.next_arrival() <= now:
      return self.ready.popleft()
    return None

  def finished(self, request, now: float) -> None:
    """`request` is done at `now`: in a closed loop the next unsent request is sent then."""
    if self.unsent:
      follower = self.unsent.popleft()
      self.arrival[id(follower)] = now
      self.ready.append(follower)  # `now` never decreases: the deque stays in arrival order

  def arrival_s(self, request) -> float:
    """When `request` arrived (was sent, in a closed loop)."""
    return self.arrival[id(request)]
