"""When a trace's requests reach the server: an open loop (a Poisson trace) or closed-loop clients.

* Open loop (`clients=None`): each request arrives at its own `arrival_s`, whatever the server
  does. A rate below the server's capacity is served as it comes, so there every policy's
  throughput is the offered load and the policies part only in latency.
* Closed loop (`clients=C`): C clients each send their next request when their last one is done
  (request i + C follows request i; the first C are sent at time 0), the way a benchmark with a
  fixed number of concurrent users loads a server (vLLM's `--max-concurrency`). Throughput then
  follows the server's speed at every load: with one client it is one user's decode speed, the
  load at which speculation should pay most.

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
    self.clients = clients
    if clients is None:
      self.arrival = {id(r): r.arrival_s for r in requests}
      self.ready = collections.deque(requests)
      self.successor = {}
    else:
      self.arrival = {id(r): 0.0 for r in requests[:clients]}
      self.ready = collections.deque(requests[:clients])
      self.successor = {id(a): b for a, b in zip(requests, requests[clients:])}

  def __bool__(self) -> bool:
    """Whether a request is waiting to be taken (arrived or not yet)."""
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
    """`request` is done at `now`: in a closed loop its client sends its next request then."""
    follower = self.successor.pop(id(request), None)
    if follower is not None:
      self.arrival[id(follower)] = now
      self.ready.append(follower)  # `now` never decreases: the deque stays in arrival order

  def arrival_s(self, request) -> float:
    return self.arrival[id(request)]
