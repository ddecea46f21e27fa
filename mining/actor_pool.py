"""Tasks on a pool of Ray actors that survives actors dying and nodes being lost.

`run_on_actors` keeps `in_flight` tasks on each of a fixed number of actor slots and yields
every task's result exactly once, in the order they finish. Ray's own `max_task_retries` covers
an actor that crashes and restarts; two cases need more, and are handled here:

- The actor's node is unreachable but not yet declared dead (Ray's health check takes
  `health_check_period_ms` x `health_check_failure_threshold`, 30 s by default). Ray reports
  `ActorUnavailableError` and its retries run out fast in that window, so the task is sent
  again every `RESEND_DELAY_S` until the actor answers, is restarted elsewhere or is declared
  dead, for at most `UNREACHABLE_WINDOW_S`.
- The actor is dead for good (`ActorDiedError`: restarts exhausted, or its node gone). A fresh
  actor from the factory takes its slot and the task is sent to it, at most `max_task_retries`
  times per task.

A task is sent again only once its previous attempt has failed, so it never has two attempts in
flight and its result comes back once. Which task a slot runs next is the caller's policy
(`next_task(slot)`); `one_queue` is the plain one. Used by `raytrieval.mining.verify` (embedding
streams through Ray Data instead); `tests/test_multinode.py` removes a busy node under it.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["RESEND_DELAY_S", "UNREACHABLE_WINDOW_S", "one_queue", "run_on_actors"]

T = TypeVar("T")

UNREACHABLE_WINDOW_S = 300.0  # how long a task waits for an unreachable actor to come back
RESEND_DELAY_S = 0.5  # between two sends of a task whose actor is unreachable


def one_queue(tasks: Iterable[T]) -> Callable[[int], T | None]:
    """The plain assignment policy: any slot takes the next task, in order; None when none is left."""
    queue = deque(tasks)
    return lambda slot: queue.popleft() if queue else None


def run_on_actors(
    make_actor: Callable[[], Any],
    workers: int,
    call: Callable[[Any, T], Any],
    next_task: Callable[[int], T | None],
    max_task_retries: int,
    in_flight: int = 2,
    name: str = "actor pool",
) -> Iterator[Any]:
    """Run tasks on `workers` actor slots and yield each task's result once, as they finish.

    Args:
        make_actor: a fresh actor handle (called once per slot, and again to replace a dead one).
        workers: actor slots.
        call: sends a task to an actor, returning its ObjectRef (e.g. `lambda a, t: a.run.remote(t)`).
        next_task: the next task for a slot, or None when there is none for it (the policy).
        max_task_retries: times a task may lose its actor for good before the run fails.
        in_flight: tasks kept on each actor, to hide the round trip.
        name: names the pool in errors.

    Raises:
        RuntimeError: a task lost its actor more than `max_task_retries` times, or an actor stayed
            unreachable for `UNREACHABLE_WINDOW_S`.
        Any error a task raised.

    The actors are killed when the generator finishes or is closed.
    """
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    if workers < 1 or in_flight < 1:
        raise ValueError(f"workers, in_flight: must be >= 1, got {workers}, {in_flight}")
    actors = [make_actor() for _ in range(workers)]
    futures: dict[Any, tuple[int, int, T, Any]] = {}  # ref -> (slot, task number, task, actor)
    died: dict[int, int] = {}  # task number -> times its actor was lost for good
    unreachable_since: dict[int, float] = {}  # task number -> first time its actor was unreachable
    numbers = itertools.count()

    def send(slot: int, number: int, task: T) -> None:
        futures[call(actors[slot], task)] = (slot, number, task, actors[slot])

    def send_next(slot: int) -> None:
        task = next_task(slot)
        if task is not None:
            send(slot, next(numbers), task)

    try:
        for _ in range(in_flight):
            for slot in range(workers):
                send_next(slot)
        while futures:
            [ready], _ = ray.wait(list(futures), num_returns=1)
            slot, number, task, actor = futures.pop(ready)
            try:
                result = ray.get(ready)
            except ActorUnavailableError as err:
                since = unreachable_since.setdefault(number, time.monotonic())
                if time.monotonic() - since > UNREACHABLE_WINDOW_S:
                    raise RuntimeError(f"{name}: an actor stayed unreachable {UNREACHABLE_WINDOW_S:.0f} s") from err
                time.sleep(RESEND_DELAY_S)
                send(slot, number, task)
                continue
            except ActorDiedError as err:
                died[number] = died.get(number, 0) + 1
                if died[number] > max_task_retries:
                    raise RuntimeError(f"{name}: a task lost its actor {died[number]} times") from err
                if actors[slot] is actor:  # the slot's other in-flight task may have replaced it already
                    actors[slot] = make_actor()
                send(slot, number, task)
                continue
            send_next(slot)
            yield result
    finally:
        for actor in actors:
            ray.kill(actor)
