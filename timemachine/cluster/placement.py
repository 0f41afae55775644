"""Replica placement: which members hold each shard, and how the cluster gets there.

Pure functions, no I/O: the metadata group's leader calls them with what it knows
(the members, the shard map of its `Configure`, the shard leaders it has heard of)
and carries out the answers as Raft membership changes and leadership transfers.
Every answer is a function of the arguments alone (no randomness, no set or hash
order), so every node computes the same plan, and a new metadata leader continues a
rebalance where the old one stopped instead of starting a different one.

Balance and minimal movement are solved exactly as min-cost flows (a replica that
moves copies a whole shard store to another node, so the fewest moves matter more
than a fast heuristic); `_FlowNetwork` is the solver both use.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

Placement = tuple[tuple[str, ...], ...]


def target_placement(
    shards: int,
    replicas: int,
    members: Sequence[str],
    current: Sequence[Sequence[str]] | None = None,
) -> Placement:
    """The balanced placement closest to ``current``: one tuple of node ids per shard.

    * Every shard gets ``k = min(replicas, len(members))`` distinct members.
    * Balance: each member holds ``floor(shards * k / n)`` or ``ceil(...)`` replicas.
    * Fewest moves: among all placements with those two properties it keeps as many
      of ``current``'s replicas as possible (a replica on a node that is no longer a
      member is never kept), and among those it spreads the moves over as many
      shards as it can (a shard's j-th new replica costs a little more than its
      (j-1)-th), so many shards move one replica each rather than a few wholesale.
      This is exact, not a heuristic: a min-cost flow source -> shard (capacity k)
      -> member (capacity 1, priced as above) -> sink, where each member's first
      ``floor`` units are free and the one extra unit ``ceil`` allows costs more than
      every move together, so the flow spreads the remainder one per member before
      it saves any move.
    * Order: a shard's kept replicas stay in ``current``'s order, new ones follow
      sorted by node id.
    * Ties (which members take the remainder, which shard hands a replica to a new
      member) are broken deterministically by shard index and node id; the order in
      which ``members`` is given does not matter.

    ``current`` must name every shard (``len(current) == shards``): the shard count
    is fixed by ``shard_of``, so changing it is a reshard, not a placement. None means
    a new cluster, which gets the round robin ``shard s on members s*k .. s*k+k-1
    (mod n)`` in id order. Feeding the answer back in as ``current`` returns it
    unchanged.
    """
    if shards < 1:
        raise ValueError(f"shards must be at least 1, not {shards}")
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, not {replicas}")
    ids = _sorted_members(members)
    n = len(ids)
    k = min(replicas, n)
    if current is None:
        # Round robin: balanced, lower ids take the remainder, and each member
        # shares shards with many others, so a lost node is re-replicated from many.
        return tuple(tuple(ids[(shard * k + j) % n] for j in range(k)) for shard in range(shards))
    if len(current) != shards:
        raise ValueError(f"current placement names {len(current)} shards, not {shards}")
    floor, remainder = divmod(shards * k, n)
    held = [dict.fromkeys(nodes) for nodes in current]

    # Vertices: source, sink, per shard one for the total and one its new replicas
    # pass through, then the members.
    source, sink = 0, 1
    member_vertex = 2 + 2 * shards
    net = _FlowNetwork(member_vertex + n)
    move = shards * k * k + 1  # dearer than any spread of moves over shards
    spread_first = shards * k * (move + k) + 1  # dearer than every move together
    arcs = []
    for shard in range(shards):
        total, new = 2 + 2 * shard, 3 + 2 * shard
        net.add_arc(source, total, k, 0)
        for j in range(k):
            # The j-th new replica of a shard costs a move plus j: as few moves as
            # possible, then spread over as many shards as possible.
            net.add_arc(total, new, 1, move + j)
        arcs.append(
            [
                net.add_arc(total if m in held[shard] else new, member_vertex + i, 1, 0)
                for i, m in enumerate(ids)
            ]
        )
    for i in range(n):
        if floor:
            net.add_arc(member_vertex + i, sink, floor, 0)
        if remainder:
            net.add_arc(member_vertex + i, sink, 1, spread_first)
    placed = net.min_cost_flow(source, sink)
    # A balanced placement always exists (round robin), so the flow places them all.
    assert placed == shards * k, (placed, shards * k)

    result = []
    for shard in range(shards):
        chosen = {ids[i] for i, arc in enumerate(arcs[shard]) if net.flow(arc)}
        kept = [m for m in held[shard] if m in chosen]
        result.append(tuple(kept + sorted(chosen.difference(kept))))
    return tuple(result)


class StepKind(str, enum.Enum):
    """What one step of a shard's move asks of its Raft group."""

    ADD = "add"
    """Add ``node`` as a learner, wait until it has caught up, promote it to voter."""
    REMOVE = "remove"
    """Remove ``node`` from the group (it is not the leader)."""
    TRANSFER_LEADERSHIP = "transfer_leadership"
    """Transfer leadership to ``node`` (a replica that stays), so that removing the
    old leader does not leave the group without one until an election."""
    PROMOTE = "promote"
    """Promote the learner ``node``, which has caught up, to voter."""


@dataclass(frozen=True, slots=True)
class Step:
    """One membership change (or leadership transfer) of one shard's Raft group."""

    kind: StepKind
    node: str

    def __post_init__(self):
        object.__setattr__(self, "kind", StepKind(self.kind))
        if not isinstance(self.node, str) or not self.node:
            raise ValueError("a step names a node")


def next_step(
    current: Sequence[str], target: Sequence[str], leader: str | None = None
) -> Step | None:
    """The next single change that takes one shard's replica set from ``current``
    toward ``target``; None when they are equal as sets.

    Adds come before removes: it adds (target order) while the group is no larger than
    its target, and removes (current order) once it is larger, or when nothing is left
    to add. So while a shard moves it never has fewer than
    ``min(len(current), len(target))`` replicas nor more than
    ``max(len(current), len(target) + 1)``, and a plain swap goes n -> n+1 -> n.

    It never removes ``leader`` while another replica has to go. When the leader is
    the last one to go it returns a ``TRANSFER_LEADERSHIP`` to the first replica in
    ``target`` order that stays; the caller transfers, then asks again with the new
    leader. Calling it after every change converges in at most
    ``|set(current) ^ set(target)| + 1`` steps.
    """
    have = list(dict.fromkeys(current))
    want = list(dict.fromkeys(target))
    if not want:
        raise ValueError("a shard needs at least one replica")
    to_add = [m for m in want if m not in have]
    to_remove = [m for m in have if m not in want]
    if to_add and len(have) <= len(want):
        return Step(StepKind.ADD, to_add[0])
    for node in to_remove:
        if node != leader:
            return Step(StepKind.REMOVE, node)
    if to_remove:
        # Only the leader is left to go. It cannot be alone here: a one-replica group
        # is never larger than its target, and then want would be empty.
        staying = [m for m in want if m in have]
        return Step(StepKind.TRANSFER_LEADERSHIP, staying[0])
    return None


def next_change(
    voters: Sequence[str],
    learners: Sequence[str],
    caught_up: Collection[str],
    target: Sequence[str],
    leader: str,
) -> Step | None:
    """The next change a shard group's ``leader`` makes toward ``target`` (`next_step`
    of its voters and learners, one at a time), given the learners that have
    ``caught_up`` with its log; None when there is nothing to do now.

    While learners of ``target`` catch up, the other learners it still needs are
    added too, and none is promoted until all of them have caught up; then they are
    promoted one after the other. So a group grows from 1 to 3 voters through 2 for
    only as long as a promotion takes, not for a whole snapshot's catching up: two
    voters cannot lose one. Nothing is removed while a learner catches up.
    """
    step = next_step([*voters, *learners], target, leader=leader)
    waiting = [n for n in learners if n in target]
    if not waiting:
        return step
    if step is not None and step.kind == StepKind.ADD:
        return step
    if all(n in caught_up for n in waiting):
        return Step(StepKind.PROMOTE, waiting[0])
    return None


def leadership_moves(
    placement: Sequence[Sequence[str]], leaders: Mapping[int, str | None]
) -> list[tuple[int, str]]:
    """Leadership transfers ``(shard, new_leader)``, by shard, that spread shard
    leaders evenly over the nodes.

    Only shards whose leader is known and is one of their replicas take part (a shard
    missing from ``leaders``, or led by None or by a node outside its replica set, is
    skipped: the map is stale and the next round sees it). The nodes counted are the
    replicas of those shards; a new leader is always a replica of its shard.

    Leader counts end within 1 of each other (``floor(L / N)`` or ``ceil(L / N)`` for L
    shards over N nodes) whenever the replica sets allow it, with the fewest transfers
    that achieve it. When they do not (a node that holds too few replicas, mostly
    mid-move), the counts above ``floor(L / N)`` are made as even as they can be: a
    node's k-th leader above the floor costs k, so the flow minimises the sum of
    triangle numbers of the excesses before it saves any transfer. Ties go to lower
    shard indexes and replica order.
    """
    led = [s for s in range(len(placement)) if _leader_of(placement, leaders, s) is not None]
    if not led:
        return []
    replica_sets = {s: list(dict.fromkeys(placement[s])) for s in led}
    nodes = sorted({m for s in led for m in replica_sets[s]})
    degree = dict.fromkeys(nodes, 0)
    for s in led:
        for m in replica_sets[s]:
            degree[m] += 1
    floor = len(led) // len(nodes)

    source, sink = 0, 1
    shard_vertex = {s: 2 + i for i, s in enumerate(led)}
    node_vertex = {m: 2 + len(led) + i for i, m in enumerate(nodes)}
    net = _FlowNetwork(2 + len(led) + len(nodes))
    arcs = {}
    for s in led:
        net.add_arc(source, shard_vertex[s], 1, 0)
        leader = leaders[s]
        for m in replica_sets[s]:
            arcs[s, m] = net.add_arc(shard_vertex[s], node_vertex[m], 1, 0 if m == leader else 1)
    excess_unit = len(led) + 1  # dearer than every transfer together
    for m in nodes:
        if floor:
            net.add_arc(node_vertex[m], sink, min(floor, degree[m]), 0)
        for k in range(1, degree[m] - floor + 1):
            net.add_arc(node_vertex[m], sink, 1, excess_unit * k)
    assigned = net.min_cost_flow(source, sink)
    assert assigned == len(led), (assigned, len(led))

    moves = []
    for s in led:
        new_leader = next(m for m in replica_sets[s] if net.flow(arcs[s, m]))
        if new_leader != leaders[s]:
            moves.append((s, new_leader))
    return moves


def meta_voters(
    members: Sequence[str],
    current_voters: Collection[str],
    max_voters: int = 5,
    leader: str | None = None,
) -> frozenset[str]:
    """The members that should vote in the metadata group; the others follow it as
    learners.

    How many: ``min(len(members), max_voters)``, made odd by one fewer when that is
    below ``max_voters``: 4 voters tolerate one failure like 3 do, but need 3 acks
    for every change instead of 2 and lose their majority to any 2 failures of 4
    nodes rather than of 3. So a cluster of 4 keeps 3 voters; growing to 5 promotes
    two. Two exceptions: a cluster of 2 keeps both voting — neither count tolerates a
    failure, but with 2 voters every committed change is on both disks, while a lone
    voter's disk would take acknowledged metadata with it; and an even ``max_voters``
    that the operator asked for is honoured (CockroachDB's ``GetNeededVoters`` makes
    the same choices).

    Which: ``leader`` first (demoting it would force an election), then the other
    current voters that are still members, then the other members by node id; within
    each group lower node ids first. Moving to the answer is a series of single
    membership changes (see `next_step`, with removes meaning demotion to learner);
    a promoted member must have caught up as a learner first.
    """
    if max_voters < 1:
        raise ValueError(f"max_voters must be at least 1, not {max_voters}")
    ids = _sorted_members(members)
    count = min(len(ids), max_voters)
    if count < max_voters and count > 2 and count % 2 == 0:
        count -= 1
    voting = set(current_voters)
    ranked = sorted(ids, key=lambda m: (m != leader, m not in voting, m))
    return frozenset(ranked[:count])


def removal_problem(
    node: str,
    placement: Sequence[Sequence[str]],
    members: Sequence[str],
    replicas: int,
    down: Collection[str] = (),
) -> str | None:
    """Why ``node`` cannot leave the cluster now, or None when it can after its
    replicas have moved to other members. The reason is for the operator: it names
    the shards and what to do, and becomes the 400 error of ``/cluster/remove``.

    ``placement`` is each shard's current replica set (its Raft group); ``down`` are
    members known to be unreachable (``node`` itself may be one: removing a dead node
    is the common case). A removal is refused when:

    * ``node`` is not a member, or is the last one;
    * it would lower replication without the operator asking: a shard on every member,
      ``node`` included, with fewer members left than ``replicas`` would keep only
      ``len(members) - 1`` copies. Acknowledged writes are promised durable on a
      majority of ``replicas`` copies, so the operator lowers ``replicas`` first
      (``/cluster/configure``), or adds a member. (A node holding no replica yet, or
      a shard not on every member, has room and is not refused.)
    * a shard of ``node`` has no reachable majority: a membership change is a Raft
      entry, so the group could neither add a replacement nor drop ``node``
      (e.g. 2 replicas with ``node`` down, or 1 replica on ``node`` down);
    * a shard of ``node`` needs a replacement and every member outside it is down.
    """
    if node not in members:
        return f"{node} is not a member of the cluster"
    remaining = len(set(members)) - 1
    if remaining < 1:
        return f"{node} is the last member of the cluster; a cluster cannot remove its last node"
    unreachable = set(down)
    everywhere, no_majority, no_room = [], [], []
    for shard, nodes in enumerate(placement):
        group = list(dict.fromkeys(nodes))
        if node not in group:
            continue
        if remaining < replicas and set(members) <= set(group):
            everywhere.append(shard)
        reachable = [m for m in group if m not in unreachable]
        majority = len(group) // 2 + 1
        if len(reachable) < majority:
            no_majority.append((shard, len(reachable), len(group), majority))
        needs_replacement = len(group) - 1 < min(replicas, remaining)
        room = [m for m in members if m not in group and m not in unreachable]
        if needs_replacement and not room:
            no_room.append(shard)
    reasons = []
    if everywhere:
        reasons.append(
            f"{_shard_list(everywhere)} would keep {remaining} of {replicas} replicas; "
            f"lower replicas to {remaining} with /cluster/configure first, or add a member"
        )
    for shard, reachable, size, majority in no_majority:
        reasons.append(
            f"shard {shard} has {reachable} of {size} replicas reachable and needs "
            f"{majority} to change its membership"
        )
    if no_room:
        reasons.append(f"no reachable member outside {_shard_list(no_room)} can take its replica")
    if not reasons:
        return None
    return f"cannot remove {node}: " + "; ".join(reasons)


def _sorted_members(members: Sequence[str]) -> list[str]:
    ids = sorted(members)
    if not ids:
        raise ValueError("a cluster has at least one member")
    for a, b in itertools.pairwise(ids):
        if a == b:
            raise ValueError(f"member {a} is listed twice")
    return ids


def _leader_of(placement, leaders, shard):
    leader = leaders.get(shard)
    return leader if leader is not None and leader in placement[shard] else None


def _shard_list(shards: list[int], shown: int = 10) -> str:
    if len(shards) == 1:
        return f"shard {shards[0]}"
    names = ", ".join(str(s) for s in shards[:shown])
    more = f" and {len(shards) - shown} more" if len(shards) > shown else ""
    return f"shards {names}{more}"


class _FlowNetwork:
    """Min-cost max-flow on integer capacities and non-negative integer costs.

    Primal-dual: Dijkstra with potentials finds the cost of the cheapest augmenting
    path, then a blocking flow (Dinic, iterative) saturates every path of that cost
    at once. Phases = distinct shortest-path costs, a handful for placement and
    leaders, so 4096 shards cost one pass per phase rather than one per replica. The
    result depends only on the order arcs were added: no sets, no randomness.
    """

    def __init__(self, vertices: int):
        self._out: list[list[int]] = [[] for _ in range(vertices)]
        self._head: list[int] = []
        self._cap: list[int] = []
        self._cost: list[int] = []

    def add_arc(self, tail: int, head: int, capacity: int, cost: int) -> int:
        """Add an arc and its residual twin; return the arc's id for `flow`."""
        if cost < 0:
            raise ValueError("costs must be non-negative")
        arc = len(self._head)
        self._head += [head, tail]
        self._cap += [capacity, 0]
        self._cost += [cost, -cost]
        self._out[tail].append(arc)
        self._out[head].append(arc + 1)
        return arc

    def flow(self, arc: int) -> int:
        return self._cap[arc ^ 1]

    def min_cost_flow(self, source: int, sink: int) -> int:
        """Send as much flow as possible at the least cost; return the amount."""
        potential = [0] * len(self._out)
        total = 0
        while True:
            dist = self._distances(source, potential)
            if dist[sink] is None:
                return total
            for v, d in enumerate(dist):
                if d is not None:
                    potential[v] += d
            total += self._blocking_flows(source, sink, potential)

    def _distances(self, source: int, potential: list[int]) -> list[int | None]:
        dist: list[int | None] = [None] * len(self._out)
        dist[source] = 0
        heap = [(0, source)]
        head, cap, cost, out = self._head, self._cap, self._cost, self._out
        while heap:
            d, u = heapq.heappop(heap)
            if d != dist[u]:
                continue
            pu = potential[u]
            for arc in out[u]:
                if cap[arc] <= 0:
                    continue
                v = head[arc]
                nd = d + cost[arc] + pu - potential[v]
                dv = dist[v]
                if dv is None or nd < dv:
                    dist[v] = nd
                    heapq.heappush(heap, (nd, v))
        return dist

    def _blocking_flows(self, source: int, sink: int, potential: list[int]) -> int:
        """Max flow over the arcs of reduced cost 0 (all of them shortest paths)."""
        head, cap, cost, out = self._head, self._cap, self._cost, self._out
        total = 0
        while True:
            level = [-1] * len(out)
            level[source] = 0
            queue = [source]
            for u in queue:
                for arc in out[u]:
                    v = head[arc]
                    if (
                        cap[arc] > 0
                        and level[v] < 0
                        and cost[arc] + potential[u] - potential[v] == 0
                    ):
                        level[v] = level[u] + 1
                        queue.append(v)
            if level[sink] < 0:
                return total
            next_arc = [0] * len(out)
            path: list[int] = []
            u = source
            while True:
                if u == sink:
                    pushed = min(cap[arc] for arc in path)
                    for arc in path:
                        cap[arc] -= pushed
                        cap[arc ^ 1] += pushed
                    total += pushed
                    path.clear()
                    u = source
                    continue
                arcs = out[u]
                i = next_arc[u]
                while i < len(arcs):
                    arc = arcs[i]
                    v = head[arc]
                    if (
                        cap[arc] > 0
                        and level[v] == level[u] + 1
                        and cost[arc] + potential[u] - potential[v] == 0
                    ):
                        break
                    i += 1
                next_arc[u] = i
                if i < len(arcs):
                    path.append(arcs[i])
                    u = head[arcs[i]]
                elif path:
                    # Dead end: never try u again in this level graph.
                    arc = path.pop()
                    u = head[arc ^ 1]
                    next_arc[u] += 1
                else:
                    break
