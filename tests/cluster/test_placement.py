"""Replica placement: balance, fewest moves, membership steps, leaders, voters, removal."""

import itertools
import random
from collections import Counter

from twisted.trial import unittest

from timemachine.cluster.placement import (
    Step,
    StepKind,
    leadership_moves,
    meta_voters,
    next_change,
    next_step,
    removal_problem,
    target_placement,
)
from timemachine.cluster.ring import Ring

SEEDS = range(300)
POOL = [f"n{i}" for i in range(1, 10)]


def counts(placement):
    return Counter(m for nodes in placement for m in nodes)


def kept(current, target):
    return sum(len(set(c) & set(t)) for c, t in zip(current, target, strict=True))


def moves(current, target):
    """Replicas the target adds: each is a learner that copies a whole shard store."""
    return sum(len(set(t) - set(c)) for c, t in zip(current, target, strict=True))


def spread(current, target):
    """How unevenly the moves fall on shards: sum over shards of 0 + 1 + ... + (m-1)."""
    return sum(
        m * (m - 1) // 2
        for m in (len(set(t) - set(c)) for c, t in zip(current, target, strict=True))
    )


def kept_upper_bound(shards, replicas, members, current):
    """No balanced placement keeps more: each shard keeps at most k of its live
    replicas, each member at most its quota, and only the remainder's members get the
    larger quota (best given to those holding the most)."""
    live = set(members)
    k = min(replicas, len(members))
    floor, remainder = divmod(shards * k, len(members))
    held = Counter(m for nodes in current for m in set(nodes) if m in live)
    most_first = sorted((held[m] for m in members), reverse=True)
    by_member = sum(min(c, floor) for c in most_first)
    by_member += sum(1 for c in most_first[:remainder] if c > floor)
    by_shard = sum(min(k, len(set(nodes) & live)) for nodes in current)
    return min(by_member, by_shard)


def balanced_placements(shards, replicas, members):
    """Every balanced placement, by brute force (tiny cases only)."""
    ids = sorted(members)
    k = min(replicas, len(ids))
    floor, remainder = divmod(shards * k, len(ids))
    ceiling = floor + (1 if remainder else 0)
    for choice in itertools.product(itertools.combinations(ids, k), repeat=shards):
        per_member = Counter(m for nodes in choice for m in nodes)
        if all(floor <= per_member[m] <= ceiling for m in ids):
            yield choice


def greedy_repair(shards, replicas, members, current):
    """Some balanced placement near ``current``, by a naive method independent of the
    flow: trim, move replicas off overloaded members, fill. Its kept count is a lower
    bound for the optimum. None when it gets stuck."""
    ids = sorted(members)
    k = min(replicas, len(ids))
    floor, remainder = divmod(shards * k, len(ids))
    ceiling = floor + (1 if remainder else 0)
    placement = [[m for m in dict.fromkeys(nodes) if m in ids] for nodes in current]
    load = Counter(m for nodes in placement for m in nodes)
    for nodes in placement:
        while len(nodes) > k:
            victim = max(nodes, key=lambda m: (load[m], m))
            nodes.remove(victim)
            load[victim] -= 1
    for _ in range(shards * k * 4):
        at_ceiling = sum(1 for m in ids if load[m] >= ceiling)
        over = [
            m for m in ids if load[m] > ceiling or (load[m] == ceiling and at_ceiling > remainder)
        ]
        if not over:
            break
        source = max(over, key=lambda m: (load[m], m))
        under = sorted(ids, key=lambda m: (load[m], m))
        for nodes, target in itertools.product(placement, under):
            if load[target] + 1 < load[source] and source in nodes and target not in nodes:
                nodes[nodes.index(source)] = target
                load[source] -= 1
                load[target] += 1
                break
        else:
            return None
    for nodes in placement:
        while len(nodes) < k:
            spare = [m for m in ids if m not in nodes]
            best = min(spare, key=lambda m: (load[m], m))
            nodes.append(best)
            load[best] += 1
    if any(not floor <= load[m] <= ceiling for m in ids):
        return None
    return tuple(tuple(nodes) for nodes in placement)


def leader_spread_and_transfers(assignment, leaders, nodes):
    """(max - min leader count over ``nodes``, transfers from ``leaders``)."""
    load = Counter(assignment.values())
    loads = [load[m] for m in nodes]
    transfers = sum(1 for s in leaders if assignment[s] != leaders[s])
    return max(loads, default=0) - min(loads, default=0), transfers


def leader_excess_and_transfers(assignment, leaders, nodes):
    """(sum over ``nodes`` of 1 + 2 + ... + (count - floor), transfers): what
    `leadership_moves` minimises, in that order, when counts within 1 are impossible."""
    load = Counter(assignment.values())
    floor = len(assignment) // len(nodes) if nodes else 0
    excess = [max(0, load[m] - floor) for m in nodes]
    return sum(e * (e + 1) // 2 for e in excess), leader_spread_and_transfers(
        assignment, leaders, nodes
    )[1]


def random_placement(rng, shards, nodes):
    """Any replica sets at all, departed nodes included, unbalanced, odd sizes."""
    return tuple(tuple(rng.sample(nodes, rng.randint(0, len(nodes)))) for _ in range(shards))


class PlacementAssertions:
    def assertBalancedPlacement(self, placement, shards, replicas, members):
        k = min(replicas, len(members))
        self.assertEqual(len(placement), shards)
        for nodes in placement:
            self.assertEqual(len(nodes), k, placement)
            self.assertEqual(len(set(nodes)), k, placement)
            self.assertLessEqual(set(nodes), set(members), placement)
        per_member = [counts(placement)[m] for m in members]
        self.assertLessEqual(max(per_member) - min(per_member), 1, per_member)


class TargetPlacementTests(PlacementAssertions, unittest.TestCase):
    def test_new_cluster_is_round_robin(self):
        self.assertEqual(target_placement(8, 1, ["n1"]), Ring.single_node("n1").config.placement)
        self.assertEqual(
            target_placement(4, 2, ["c", "a", "b"]),
            (("a", "b"), ("c", "a"), ("b", "c"), ("a", "b")),
        )

    def test_one_node_to_three_with_three_replicas(self):
        one = target_placement(12, 3, ["n1"])
        self.assertEqual(one, (("n1",),) * 12)
        three = target_placement(12, 3, ["n1", "n2", "n3"], one)
        self.assertEqual(three, (("n1", "n2", "n3"),) * 12)
        self.assertEqual(moves(one, three), 24)

    def test_five_nodes_hold_36_replicas_as_7_7_7_7_8(self):
        three = (("n1", "n2", "n3"),) * 12
        members = ["n1", "n2", "n3", "n4", "n5"]
        five = target_placement(12, 3, members, three)
        self.assertBalancedPlacement(five, 12, 3, members)
        self.assertEqual(sorted(counts(five).values()), [7, 7, 7, 7, 8])
        # The new members need 7 each; nothing else moves.
        self.assertEqual(moves(three, five), 14)
        # 14 moves over 12 shards: two shards move twice, none three times.
        self.assertEqual(
            Counter(len(set(t) - set(c)) for c, t in zip(three, five, strict=True)), {1: 10, 2: 2}
        )

    def test_a_node_leaving_moves_only_what_balance_needs(self):
        members = ["n1", "n2", "n3", "n4", "n5"]
        five = target_placement(12, 3, members)
        by_count = counts(five)
        busiest = max(members, key=lambda m: (by_count[m], m))
        quietest = min(members, key=lambda m: (by_count[m], m))
        self.assertEqual((by_count[busiest], by_count[quietest]), (8, 7))
        for leaving in (busiest, quietest):
            rest = [m for m in members if m != leaving]
            four = target_placement(12, 3, rest, five)
            self.assertBalancedPlacement(four, 12, 3, rest)
            self.assertEqual(set(counts(four).values()), {9})
            self.assertNotIn(leaving, counts(four))
            # The others hold 36 less the leaver's replicas and need 9 each: the
            # leaver's replicas move and nothing else does.
            self.assertEqual(moves(five, four), by_count[leaving])
            self.assertEqual(kept(five, four), 36 - by_count[leaving])

    def test_replication_factor_one_to_three_to_two(self):
        members = ["n1", "n2", "n3"]
        rf1 = target_placement(12, 1, members)
        self.assertEqual(set(counts(rf1).values()), {4})
        rf3 = target_placement(12, 3, members, rf1)
        self.assertEqual(set(counts(rf3).values()), {12})
        self.assertEqual(moves(rf1, rf3), 24)
        for before, after in zip(rf1, rf3, strict=True):
            self.assertEqual(after[0], before[0], "the existing replica stays first")
        rf2 = target_placement(12, 2, members, rf3)
        self.assertBalancedPlacement(rf2, 12, 2, members)
        self.assertEqual(set(counts(rf2).values()), {8})
        self.assertEqual(moves(rf3, rf2), 0, "lowering replicas only removes")
        for before, after in zip(rf3, rf2, strict=True):
            self.assertEqual(after, tuple(m for m in before if m in after), "order kept")

    def test_more_replicas_than_members(self):
        self.assertEqual(target_placement(3, 5, ["b", "a"]), (("a", "b"), ("a", "b"), ("a", "b")))

    def test_departed_members_are_dropped_and_order_is_kept_then_new(self):
        current = (("gone", "n3", "n1"), ("n2", "n1", "n3"))
        target = target_placement(2, 3, ["n1", "n2", "n3", "n4"], current)
        self.assertNotIn("gone", counts(target))
        for before, after in zip(current, target, strict=True):
            old = [m for m in after if m in before]
            new = [m for m in after if m not in before]
            self.assertEqual(list(after), old + sorted(new))
            self.assertEqual(old, [m for m in before if m in after])

    def test_errors(self):
        self.assertRaises(ValueError, target_placement, 0, 1, ["a"])
        self.assertRaises(ValueError, target_placement, 1, 0, ["a"])
        self.assertRaises(ValueError, target_placement, 1, 1, [])
        self.assertRaises(ValueError, target_placement, 1, 1, ["a", "a"])
        self.assertRaises(ValueError, target_placement, 2, 1, ["a"], (("a",),))

    def test_randomized_properties(self):
        for seed in SEEDS:
            rng = random.Random(seed)
            members = rng.sample(POOL, rng.randint(1, 7))
            shards, replicas = rng.randint(1, 40), rng.randint(1, 5)
            current = random_placement(rng, shards, POOL)
            target = target_placement(shards, replicas, members, current)
            with self.subTest(seed=seed):
                self.assertBalancedPlacement(target, shards, replicas, members)
                self.assertLessEqual(
                    kept(current, target), kept_upper_bound(shards, replicas, members, current)
                )
                greedy = greedy_repair(shards, replicas, members, current)
                if greedy is not None:
                    self.assertBalancedPlacement(greedy, shards, replicas, members)
                    self.assertGreaterEqual(kept(current, target), kept(current, greedy))
                shuffled = rng.sample(members, len(members))
                self.assertEqual(target_placement(shards, replicas, shuffled, current), target)
                self.assertEqual(target_placement(shards, replicas, members, target), target)

    def test_fewest_moves_by_brute_force(self):
        """Tiny cases against every balanced placement: the fewest moves, and among
        those the moves spread over the most shards."""
        for seed in range(120):
            rng = random.Random(seed)
            members = rng.sample(POOL[:5], rng.randint(1, 4))
            shards, replicas = rng.randint(1, 3), rng.randint(1, 3)
            current = random_placement(rng, shards, POOL[:5])
            target = target_placement(shards, replicas, members, current)
            best = min(
                (moves(current, p), spread(current, p))
                for p in balanced_placements(shards, replicas, members)
            )
            with self.subTest(seed=seed):
                self.assertEqual((moves(current, target), spread(current, target)), best)

    def test_joins_and_replication_changes_move_the_forced_minimum(self):
        """From a balanced map, members joining or the factor changing move no more
        replicas than the bound every balanced placement must pay."""
        for seed in SEEDS:
            rng = random.Random(seed)
            members = rng.sample(POOL, rng.randint(1, 6))
            shards, replicas = rng.randint(1, 40), rng.randint(1, 5)
            current = target_placement(shards, replicas, members)
            if rng.random() < 0.5:
                members = members + [m for m in POOL if m not in members][: rng.randint(1, 3)]
            else:
                replicas = rng.randint(1, 5)
            target = target_placement(shards, replicas, members, current)
            with self.subTest(seed=seed):
                self.assertBalancedPlacement(target, shards, replicas, members)
                self.assertEqual(
                    kept(current, target), kept_upper_bound(shards, replicas, members, current)
                )

    def test_scale(self):
        members = [f"node{i:02}" for i in range(10)]
        before = target_placement(4096, 3, members[:-1])
        after = target_placement(4096, 3, members, before)
        self.assertBalancedPlacement(after, 4096, 3, members)
        self.assertEqual(moves(before, after), 4096 * 3 // 10)


class NextStepTests(unittest.TestCase):
    def test_equal_sets_need_nothing(self):
        self.assertIsNone(next_step(("a", "b", "c"), ("c", "a", "b")))

    def test_swap_adds_before_it_removes(self):
        self.assertEqual(next_step(("a", "b", "c"), ("a", "b", "d")), Step(StepKind.ADD, "d"))
        self.assertEqual(
            next_step(("a", "b", "c", "d"), ("a", "b", "d")), Step(StepKind.REMOVE, "c")
        )

    def test_growing_and_shrinking(self):
        self.assertEqual(next_step(("a",), ("a", "b", "c")), Step(StepKind.ADD, "b"))
        self.assertEqual(next_step(("a", "b", "c"), ("a",)), Step(StepKind.REMOVE, "b"))
        # Shrinking while swapping: remove first, never below the target's size.
        self.assertEqual(next_step(("a", "b", "c"), ("a", "d")), Step(StepKind.REMOVE, "b"))
        self.assertEqual(next_step(("a", "c"), ("a", "d")), Step(StepKind.ADD, "d"))

    def test_never_removes_the_leader_while_another_can_go(self):
        self.assertEqual(
            next_step(("a", "b", "c", "d"), ("c", "d"), leader="a"), Step(StepKind.REMOVE, "b")
        )
        self.assertEqual(
            next_step(("a", "c", "d"), ("c", "d"), leader="a"),
            Step(StepKind.TRANSFER_LEADERSHIP, "c"),
        )
        self.assertEqual(
            next_step(("a", "c", "d"), ("c", "d"), leader="c"), Step(StepKind.REMOVE, "a")
        )

    def test_step_kinds_compare_as_strings(self):
        self.assertEqual(Step("add", "x"), Step(StepKind.ADD, "x"))
        self.assertEqual(Step(StepKind.REMOVE, "x").kind, "remove")
        self.assertRaises(ValueError, Step, "demote", "x")
        self.assertRaises(ValueError, Step, StepKind.ADD, "")

    def test_empty_target_is_refused(self):
        self.assertRaises(ValueError, next_step, ("a",), ())

    def test_randomized_sequences_converge_safely(self):
        for seed in range(500):
            rng = random.Random(seed)
            current = tuple(rng.sample(POOL, rng.randint(1, 6)))
            target = tuple(rng.sample(POOL, rng.randint(1, 6)))
            leader = first_leader = rng.choice(current)
            floor = min(len(current), len(target))
            ceiling = max(len(current), len(target) + 1)
            budget = len(set(current) ^ set(target)) + 1
            group = list(current)
            taken = []
            with self.subTest(seed=seed, current=current, target=target, leader=leader):
                while (step := next_step(group, target, leader)) is not None:
                    taken.append(step)
                    self.assertLessEqual(len(taken), budget, taken)
                    if step.kind is StepKind.ADD:
                        self.assertNotIn(step.node, group)
                        self.assertIn(step.node, target)
                        group.append(step.node)
                    elif step.kind is StepKind.REMOVE:
                        self.assertNotEqual(step.node, leader)
                        self.assertNotIn(step.node, target)
                        group.remove(step.node)
                    else:
                        self.assertIn(step.node, group)
                        self.assertIn(step.node, target)
                        leader = step.node
                    self.assertGreaterEqual(len(group), floor, taken)
                    self.assertLessEqual(len(group), ceiling, taken)
                self.assertEqual(set(group), set(target))
                self.assertIn(leader, group)
                transfers = sum(1 for s in taken if s.kind is StepKind.TRANSFER_LEADERSHIP)
                self.assertEqual(len(taken), budget - 1 + transfers)
                self.assertEqual(transfers, 0 if first_leader in target else 1)


class NextChangeTests(unittest.TestCase):
    """What a shard leader changes next, given which learners have caught up."""

    def test_growing_adds_every_learner_before_it_promotes_any(self):
        # From one voter to three: a group of two voters cannot lose one, so it is one
        # only between two promotions, never while a snapshot is sent.
        self.assertEqual(
            next_change(["a"], [], set(), ["a", "b", "c"], "a"), Step(StepKind.ADD, "b")
        )
        self.assertEqual(
            next_change(["a"], ["b"], set(), ["a", "b", "c"], "a"), Step(StepKind.ADD, "c")
        )
        self.assertIsNone(next_change(["a"], ["b", "c"], {"b"}, ["a", "b", "c"], "a"))
        self.assertEqual(
            next_change(["a"], ["b", "c"], {"b", "c"}, ["a", "b", "c"], "a"),
            Step(StepKind.PROMOTE, "b"),
        )
        self.assertEqual(
            next_change(["a", "b"], ["c"], {"c"}, ["a", "b", "c"], "a"),
            Step(StepKind.PROMOTE, "c"),
        )
        self.assertIsNone(next_change(["a", "b", "c"], [], set(), ["a", "b", "c"], "a"))

    def test_a_swap_removes_only_after_the_promotion(self):
        self.assertEqual(
            next_change(["a", "b", "c"], [], set(), ["a", "b", "d"], "a"),
            Step(StepKind.ADD, "d"),
        )
        self.assertIsNone(next_change(["a", "b", "c"], ["d"], set(), ["a", "b", "d"], "a"))
        self.assertEqual(
            next_change(["a", "b", "c"], ["d"], {"d"}, ["a", "b", "d"], "a"),
            Step(StepKind.PROMOTE, "d"),
        )
        self.assertEqual(
            next_change(["a", "b", "c", "d"], [], set(), ["a", "b", "d"], "a"),
            Step(StepKind.REMOVE, "c"),
        )

    def test_a_learner_the_map_no_longer_names_is_removed(self):
        self.assertEqual(
            next_change(["a", "b", "c"], ["d"], set(), ["a", "b", "c"], "a"),
            Step(StepKind.REMOVE, "d"),
        )


class LeadershipMovesTests(unittest.TestCase):
    def test_all_leaders_on_one_node_spread_to_four_each(self):
        placement = (("n1", "n2", "n3"),) * 12
        transfers = leadership_moves(placement, dict.fromkeys(range(12), "n1"))
        self.assertEqual(len(transfers), 8)
        leaders = dict.fromkeys(range(12), "n1") | dict(transfers)
        self.assertEqual(set(Counter(leaders.values()).values()), {4})

    def test_balanced_leaders_stay(self):
        placement = (("a", "b"), ("b", "a"), ("a", "b"))
        self.assertEqual(leadership_moves(placement, {0: "a", 1: "b", 2: "a"}), [])

    def test_unknown_and_foreign_leaders_are_skipped(self):
        placement = (("a", "b"), ("a", "b"), ("a", "b"), ("a", "b"))
        leaders = {0: "a", 1: "a", 2: None, 3: "zz"}
        self.assertEqual(leadership_moves(placement, leaders), [(1, "b")])
        self.assertEqual(leadership_moves(placement, {}), [])

    def test_single_replica_shards_cannot_move(self):
        placement = (("a",), ("a",), ("b",))
        self.assertEqual(leadership_moves(placement, {0: "a", 1: "a", 2: "b"}), [])

    def test_fewest_transfers_by_brute_force(self):
        for seed in SEEDS:
            rng = random.Random(seed)
            nodes = POOL[: rng.randint(1, 5)]
            shards = rng.randint(1, 6)
            placement = tuple(
                tuple(rng.sample(nodes, rng.randint(1, len(nodes)))) for _ in range(shards)
            )
            leaders = {s: rng.choice(placement[s]) for s in range(shards) if rng.random() < 0.9}
            led = sorted(leaders)
            transfers = leadership_moves(placement, leaders)
            after = leaders | dict(transfers)
            with self.subTest(seed=seed, placement=placement, leaders=leaders):
                self.assertEqual([s for s, _ in transfers], sorted({s for s, _ in transfers}))
                for s, node in transfers:
                    self.assertIn(node, placement[s])
                    self.assertNotEqual(node, leaders[s])
                self.assertEqual(leadership_moves(placement, leaders), transfers)
                self.assertEqual(leadership_moves(placement, after), [])
                involved = sorted({m for s in led for m in placement[s]})

                options = [
                    dict(zip(led, choice, strict=True))
                    for choice in itertools.product(*(placement[s] for s in led))
                ]
                even = [
                    leader_spread_and_transfers(o, leaders, involved)
                    for o in options
                    if leader_spread_and_transfers(o, leaders, involved)[0] <= 1
                ]
                got = leader_spread_and_transfers(after, leaders, involved)
                if even:
                    self.assertLessEqual(got[0], 1)
                    self.assertEqual(got[1], min(cost for _, cost in even))
                self.assertEqual(
                    leader_excess_and_transfers(after, leaders, involved),
                    min(leader_excess_and_transfers(o, leaders, involved) for o in options),
                )


class MetaVotersTests(unittest.TestCase):
    def test_how_many_vote(self):
        for size, voters in ((1, 1), (2, 2), (3, 3), (4, 3), (5, 5), (6, 5), (9, 5)):
            members = POOL[:size]
            self.assertEqual(len(meta_voters(members, ())), voters, size)
            self.assertLessEqual(meta_voters(members, ()), set(members))

    def test_an_even_maximum_that_was_asked_for_is_kept(self):
        self.assertEqual(len(meta_voters(POOL[:6], (), max_voters=4)), 4)
        self.assertEqual(len(meta_voters(POOL[:3], (), max_voters=4)), 3)
        self.assertEqual(len(meta_voters(POOL[:9], (), max_voters=1)), 1)

    def test_current_voters_keep_their_votes(self):
        members = ["a", "b", "c", "d", "e", "f"]
        self.assertEqual(meta_voters(members, {"b", "d", "f"}), {"a", "b", "c", "d", "f"})
        self.assertEqual(meta_voters(members[:4], {"b", "d", "f"}), {"a", "b", "d"})

    def test_departed_voter_is_replaced_by_lowest_id(self):
        self.assertEqual(meta_voters(["a", "c", "d", "e"], {"b", "c", "d"}), {"a", "c", "d"})

    def test_shrinking_keeps_the_leader(self):
        members = ["a", "b", "c", "d"]
        self.assertEqual(meta_voters(members, {"a", "b", "c", "d"}, leader="d"), {"a", "b", "d"})
        self.assertEqual(meta_voters(members, {"a", "b", "c", "d"}), {"a", "b", "c"})

    def test_errors(self):
        self.assertRaises(ValueError, meta_voters, [], ())
        self.assertRaises(ValueError, meta_voters, ["a"], (), max_voters=0)

    def test_randomized_properties(self):
        for seed in SEEDS:
            rng = random.Random(seed)
            members = rng.sample(POOL, rng.randint(1, 9))
            current = set(rng.sample(POOL, rng.randint(0, 6)))
            voters = meta_voters(members, current)
            count = min(len(members), 5)
            with self.subTest(seed=seed):
                self.assertEqual(len(voters), count - 1 if count == 4 else count)
                self.assertLessEqual(voters, set(members))
                still = current & set(members)
                self.assertEqual(len(voters & still), min(len(voters), len(still)))
                self.assertEqual(meta_voters(list(reversed(members)), current), voters)
                self.assertEqual(meta_voters(members, voters), voters)


class RemovalProblemTests(unittest.TestCase):
    def test_a_node_with_room_elsewhere_can_go(self):
        members = ["n1", "n2", "n3", "n4"]
        placement = target_placement(8, 3, members)
        for node in members:
            self.assertIsNone(removal_problem(node, placement, members, 3))

    def test_not_a_member_and_last_member(self):
        self.assertEqual(
            removal_problem("x", (("a",),), ["a"], 1), "x is not a member of the cluster"
        )
        self.assertIn("last member", removal_problem("a", (("a",),), ["a"], 1))

    def test_three_members_three_replicas_asks_to_lower_replicas_first(self):
        members = ["n1", "n2", "n3"]
        placement = target_placement(4, 3, members)
        reason = removal_problem("n2", placement, members, 3)
        self.assertEqual(
            reason,
            "cannot remove n2: shards 0, 1, 2, 3 would keep 2 of 3 replicas; "
            "lower replicas to 2 with /cluster/configure first, or add a member",
        )
        # After the operator lowers the factor, the same removal is fine.
        self.assertIsNone(
            removal_problem("n2", target_placement(4, 2, members, placement), members, 2)
        )

    def test_a_growing_cluster_may_drop_a_node_unless_replication_drops(self):
        """Replicas 3 with 2 members: both hold every shard. A third member joined
        but holds nothing yet: removing it, or one of the others (the newcomer takes
        the replicas), leaves every shard its 2 copies; with 2 members, it does not."""
        placement = (("a", "b"),) * 3
        for node in ("a", "b", "c"):
            self.assertIsNone(removal_problem(node, placement, ["a", "b", "c"], 3))
        self.assertEqual(
            removal_problem("a", placement, ["a", "b"], 3),
            "cannot remove a: shards 0, 1, 2 would keep 1 of 3 replicas; "
            "lower replicas to 1 with /cluster/configure first, or add a member",
        )

    def test_a_shard_without_a_reachable_majority_cannot_change(self):
        members = ["a", "b", "c", "d"]
        placement = (("a", "b", "c"), ("b", "c", "d"), ("a", "c", "d"))
        self.assertIsNone(removal_problem("a", placement, members, 3, down={"a"}))
        self.assertEqual(
            removal_problem("a", placement, members, 3, down={"a", "c"}),
            "cannot remove a: shard 0 has 1 of 3 replicas reachable and needs 2 to change "
            "its membership; shard 2 has 1 of 3 replicas reachable and needs 2 to change "
            "its membership",
        )

    def test_two_replicas_with_the_node_down_are_stuck(self):
        members = ["a", "b", "c"]
        placement = (("a", "b"), ("b", "c"), ("c", "a"))
        self.assertIsNone(removal_problem("a", placement, members, 2))
        self.assertIn("shard 0 has 1 of 2", removal_problem("a", placement, members, 2, down={"a"}))

    def test_one_replica_on_a_dead_node_is_lost(self):
        placement = (("a",), ("b",))
        self.assertIsNone(removal_problem("a", placement, ["a", "b"], 1))
        self.assertIn(
            "shard 0 has 0 of 1", removal_problem("a", placement, ["a", "b"], 1, down={"a"})
        )

    def test_no_reachable_member_to_take_the_replica(self):
        members = ["a", "b", "c", "d"]
        placement = (("a", "b", "c"), ("b", "c", "d"))
        self.assertEqual(
            removal_problem("a", placement, members, 3, down={"d"}),
            "cannot remove a: no reachable member outside shard 0 can take its replica",
        )

    def test_long_shard_lists_are_cut(self):
        members = ["a", "b"]
        placement = target_placement(30, 2, members)
        self.assertIn(
            "shards 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 and 20 more would keep 1 of 2",
            removal_problem("a", placement, members, 2),
        )

    def test_an_allowed_removal_leaves_room_for_every_shard(self):
        for seed in SEEDS:
            rng = random.Random(seed)
            members = rng.sample(POOL, rng.randint(1, 6))
            shards, replicas = rng.randint(1, 20), rng.randint(1, 4)
            placement = target_placement(shards, replicas, members)
            node = rng.choice(members)
            reason = removal_problem(node, placement, members, replicas)
            rest = [m for m in members if m != node]
            with self.subTest(seed=seed):
                self.assertEqual(reason is None, len(rest) >= replicas)
                if reason is None:
                    after = target_placement(shards, replicas, rest, placement)
                    for before, nodes in zip(placement, after, strict=True):
                        self.assertGreaterEqual(len(nodes), min(len(before), replicas))
                else:
                    self.assertTrue(
                        reason.startswith(f"cannot remove {node}: ") or "last" in reason
                    )
