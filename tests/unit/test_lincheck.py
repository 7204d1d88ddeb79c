"""Unit tests for the key-value linearizability checker used by the fault tests."""

from __future__ import annotations

import io
import itertools
import random

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.faults.history import dump_history, operation_from_json, operation_to_json
from tests.faults.lincheck import CheckResult, Operation, check, load_history, save_history

K = b"k"


def put(client, value, call, ret, key=K):
    """Return a put of `value`; `ret` None means its outcome is unknown."""
    return Operation(client, "put", key, value=value, call=call, ret=ret)


def delete(client, call, ret, key=K):
    """Return a delete; `ret` None means its outcome is unknown."""
    return Operation(client, "delete", key, call=call, ret=ret)


def get(client, output, call, ret, key=K):
    """Return a get that observed `output` (None for "not found")."""
    return Operation(client, "get", key, call=call, ret=ret, output=output)


def cas(client, expected, new, output, call, ret, key=K):
    """Return a cas from `expected` to `new` that observed `output` (None when ret is None)."""
    return Operation(client, "cas", key, value=new, expected=expected, call=call, ret=ret, output=output)


def assert_ok(history, **kwargs):
    result = check(history, **kwargs)
    assert result.verdict == "ok", result.describe()
    assert result.ok
    return result


def assert_violation(history, **kwargs):
    result = check(history, **kwargs)
    assert result.verdict == "violation", result.describe()
    assert not result.ok
    return result


# Linearizable histories.


def test_sequential_history_with_deletes_is_ok():
    assert_ok(
        [
            get(1, None, 0, 1),
            put(1, b"v1", 2, 3),
            get(2, b"v1", 4, 5),
            put(2, b"v2", 6, 7),
            get(1, b"v2", 8, 9),
            delete(1, 10, 11),
            get(2, None, 12, 13),
            put(2, b"v3", 14, 15),
            get(1, b"v3", 16, 17),
        ]
    )


@pytest.mark.parametrize("seen", [b"v1", b"v2"])
def test_read_overlapping_two_writes_may_see_either(seen):
    assert_ok(
        [
            put(1, b"v1", 0, 10),
            put(2, b"v2", 1, 9),
            get(3, seen, 2, 8),
            get(3, seen, 11, 12),
        ]
    )


def test_reads_during_concurrent_writes_may_see_them_in_either_order():
    # Both writes span both reads, so "v2 then v1" is a valid order even though v1 was called first.
    assert_ok(
        [
            put(1, b"v1", 0, 10),
            put(2, b"v2", 1, 9),
            get(3, b"v2", 2, 3),
            get(3, b"v1", 4, 5),
        ]
    )


def test_cas_chain_is_ok():
    assert_ok(
        [
            cas(1, None, b"v0", True, 0, 1),
            cas(2, b"v0", b"v1", True, 2, 3),
            cas(1, b"v1", b"v2", True, 4, 5),
            cas(2, b"v0", b"v3", False, 6, 7),
            cas(1, None, b"v4", False, 8, 9),
            get(2, b"v2", 10, 11),
        ]
    )


def test_concurrent_cas_with_same_expected_one_wins_is_ok():
    assert_ok(
        [
            put(1, b"v0", 0, 1),
            cas(2, b"v0", b"v1", False, 2, 5),
            cas(3, b"v0", b"v2", True, 3, 6),
            get(1, b"v2", 7, 8),
        ]
    )


def test_cas_expecting_absent_key_succeeds_after_delete():
    assert_ok(
        [
            put(1, b"v1", 0, 1),
            delete(1, 2, 3),
            cas(2, None, b"v2", True, 4, 5),
            get(1, b"v2", 6, 7),
        ]
    )


def test_unknown_put_observed_much_later_is_ok():
    assert_ok(
        [
            put(1, b"v1", 0, 1),
            put(2, b"v2", 2, None),
            get(1, b"v1", 3, 4),
            get(1, b"v1", 50, 51),
            get(3, b"v2", 100, 101),
            get(3, b"v2", 102, 103),
        ]
    )


def test_unknown_put_never_observed_is_ok():
    assert_ok(
        [
            put(1, b"v1", 0, 1),
            put(2, b"v2", 2, None),
            get(1, b"v1", 3, 4),
            get(3, b"v1", 100, 101),
        ]
    )


def test_unknown_put_never_observed_is_ok_next_to_a_failed_cas():
    # The failed cas keeps the unknown writes in the search, which must then leave them out
    # (the unknown cas can never succeed, so it has to be left out).
    assert_ok(
        [
            put(1, b"v1", 0, 1),
            put(2, b"v2", 2, None),
            cas(3, b"v0", b"v3", False, 3, 4),
            cas(4, b"v9", b"v4", None, 4, None),
            get(1, b"v1", 5, 6),
        ]
    )


def test_unknown_put_can_explain_a_failed_cas():
    # The cas can only fail if the unknown put of v2 happened; dropping it would be wrong.
    assert_ok(
        [
            put(1, b"v1", 0, 1),
            put(2, b"v2", 2, None),
            cas(1, b"v1", b"v3", False, 5, 6),
        ]
    )


def test_unknown_delete_and_unknown_cas_may_take_effect():
    assert_ok(
        [
            put(1, b"v1", 0, 1),
            delete(2, 2, None),
            get(1, None, 3, 4),
            cas(3, None, b"v2", None, 5, None),
            get(1, b"v2", 6, 7),
        ]
    )


def test_unknown_get_is_ignored():
    assert_ok([put(1, b"v1", 0, 1), get(2, None, 2, None), get(1, b"v1", 3, 4)])


def test_initial_state_is_honoured():
    history = [get(1, b"old", 0, 1)]
    assert_ok(history, initial={K: b"old"})
    assert_violation(history)


def test_each_key_has_its_own_state():
    a, b = b"a", b"b"
    assert_ok([put(1, b"va", 0, 1, key=a), put(2, b"vb", 0, 1, key=b), get(1, b"va", 2, 3, key=a)])
    result = assert_violation([put(1, b"va", 0, 1, key=a), get(1, b"va", 2, 3, key=b)])
    assert result.key == b


# Violating histories.


def test_stale_read_is_a_violation():
    stale = get(3, b"v1", 4, 5)
    result = assert_violation([put(1, b"v1", 0, 1), put(2, b"v2", 2, 3), stale])
    assert result.key == K
    # The search places put v1, then cannot place put v2 without stranding the stale read.
    assert [o.value for o in result.violation.prefix] == [b"v1"]
    assert result.violation.state == b"v1"
    assert result.violation.blocked.value == b"v2"
    assert result.violation.stranded == (stale,)
    assert "could not be placed" in result.describe()


def test_lost_update_is_a_violation():
    assert_violation(
        [
            put(1, b"v0", 0, 1),
            cas(2, b"v0", b"v1", True, 2, 5),
            cas(3, b"v0", b"v2", True, 3, 6),
        ]
    )


def test_read_of_a_value_never_written_is_a_violation():
    result = assert_violation([put(1, b"v1", 0, 1), get(2, b"ghost", 0.5, 3)])
    assert result.violation.blocked.output == b"ghost"


def test_read_of_nothing_after_a_completed_put_is_a_violation():
    assert_violation([put(1, b"v1", 0, 1), get(2, None, 2, 3)])


def test_unknown_put_cannot_be_undone_after_it_was_observed():
    assert_violation(
        [
            put(1, b"v1", 0, 1),
            put(2, b"v2", 2, None),
            get(3, b"v2", 5, 6),
            get(3, b"v1", 7, 8),
        ]
    )


def test_unknown_cas_cannot_swap_a_value_it_did_not_expect():
    assert_violation(
        [
            put(1, b"v1", 0, 1),
            cas(2, b"v0", b"v2", None, 2, None),
            get(3, b"v2", 5, 6),
        ]
    )


def test_violation_on_one_key_is_reported_even_when_another_runs_out_of_budget():
    a, z = b"a", b"z"
    history = [put(1, b"v1", 0, 1, key=a), get(1, None, 2, 3, key=a)]
    history += [put(c, b"z%d" % c, 10, 20, key=z) for c in range(20)]
    result = check(history, max_steps=10)
    assert result.verdict == "violation", result.describe()
    assert result.key == a
    assert result.unknown_keys == (z,)


# The search budget.


def _wide_concurrent_history(writers=12):
    writes = [put(c, b"w%d" % c, 0, 100) for c in range(writers)]
    return writes + [get(99, b"w0", 101, 102)]


def test_exhausted_step_budget_is_unknown_and_not_ok():
    history = _wide_concurrent_history()
    assert check(history).ok
    result = check(history, max_steps=5)
    assert result.verdict == "unknown"
    assert not result.ok
    assert result.unknown_keys == (K,)
    with pytest.raises(TypeError):
        bool(result)


def test_exhausted_timeout_is_unknown_and_not_ok():
    ticks = iter(range(10**6))
    result = check(_wide_concurrent_history(), timeout=0.5, clock=lambda: next(ticks))
    assert result.verdict == "unknown"
    assert not result.ok


def test_malformed_operation_is_rejected():
    with pytest.raises(ValueError, match="cas output"):
        check([cas(1, None, b"v", None, 0, 1)])
    with pytest.raises(ValueError, match="before call"):
        check([put(1, b"v", 5, 1)])


# Saved histories.


def test_saved_history_loads_back_and_checks_the_same(tmp_path):
    history = [
        put("c1", b"\x00\xff", 0.125, 1.5),
        cas(2, None, b"v", False, 1.0, 2.0),
        cas(2, b"\x00\xff", b"v", None, 3.0, None),
        get("c1", b"v", 4.0, 5.0),
        delete(3, 6.0, 7.0),
        get(3, None, 8.0, 9.0),
    ]
    path = tmp_path / "history.jsonl"
    save_history(history, path)
    assert load_history(path) == history
    assert check(load_history(path)).ok


def test_corrupt_history_file_names_the_line(tmp_path):
    path = tmp_path / "history.jsonl"
    path.write_text('{"client":1,"op":"put","key":"6b","value":"76","call":0,"ret":1}\n{"op":"jump"}\n')
    with pytest.raises(ValueError, match=":2:"):
        load_history(path)


# Generated histories.


@st.composite
def model_histories(draw):
    """Draw a history from the model itself, with a linearization point inside every interval.

    The n-th operation takes effect at time n; its call is up to three time units before that
    and its return up to three after, so the history is linearizable whatever the overlaps.
    Some writes have an unknown outcome (they did take effect), and some extra unknown writes
    never took effect at all.
    """
    keys = [b"a", b"b", b"c"]
    state: dict[bytes, bytes | None] = {k: None for k in keys}
    written: list[bytes] = []
    history = []
    widths = st.sampled_from([0.0, 0.0, 0.25, 1.0, 3.0])
    count = draw(st.integers(min_value=1, max_value=40))
    for n in range(count):
        key = draw(st.sampled_from(keys))
        kind = draw(st.sampled_from(["put", "get", "get", "delete", "cas", "ghost"]))
        call = n - draw(widths)
        ret = n + draw(widths)
        unknown = kind in ("put", "delete", "cas") and draw(st.integers(0, 4)) == 0
        client = draw(st.integers(0, 5))
        fresh = b"v%d" % len(written)
        if kind == "put":
            written.append(fresh)
            state[key] = fresh
            history.append(put(client, fresh, call, None if unknown else ret, key=key))
        elif kind == "delete":
            state[key] = None
            history.append(delete(client, call, None if unknown else ret, key=key))
        elif kind == "get":
            history.append(get(client, state[key], call, ret, key=key))
        elif kind == "cas":
            choices = [state[key], None] + written[-3:]
            expected = draw(st.sampled_from(choices))
            swapped = expected == state[key]
            written.append(fresh)
            if swapped:
                state[key] = fresh
            if unknown and swapped:
                history.append(cas(client, expected, fresh, None, call, None, key=key))
            else:
                history.append(cas(client, expected, fresh, swapped, call, ret, key=key))
        else:
            written.append(fresh)
            history.append(put(client, fresh, call, None, key=key))
    draw(st.randoms(use_true_random=False)).shuffle(history)
    return history


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model_histories())
def test_histories_generated_from_the_model_are_ok(history):
    assert_ok(history)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model_histories(), st.integers(min_value=0))
def test_a_read_of_a_never_written_value_is_always_a_violation(history, pick):
    reads = [i for i, o in enumerate(history) if o.op == "get" and o.ret is not None]
    assume(reads)
    i = reads[pick % len(reads)]
    o = history[i]
    history[i] = get(o.client, b"never-written", o.call, o.ret, key=o.key)
    result = assert_violation(history)
    assert result.key == o.key


@settings(max_examples=100, deadline=None)
@given(model_histories())
def test_history_json_round_trip(history):
    stream = io.StringIO()
    dump_history(history, stream)
    assert [operation_from_json(operation_to_json(o)) for o in history] == history
    assert len(stream.getvalue().splitlines()) == len(history)


# Size.


def _random_concurrent_history(operations, keys, clients, seed):
    """Return a linearizable history of many overlapping operations, built like the generator."""
    rng = random.Random(seed)
    state = {b"key-%d" % k: None for k in range(keys)}
    history = []
    for n in range(operations):
        key = rng.choice(list(state))
        call, ret = n - rng.uniform(0, clients), n + rng.uniform(0, clients)
        roll = rng.random()
        if roll < 0.4:
            history.append(get(n % clients, state[key], call, ret, key=key))
        elif roll < 0.75:
            state[key] = b"v%d" % n
            history.append(put(n % clients, state[key], call, None if roll > 0.73 else ret, key=key))
        elif roll < 0.8:
            state[key] = None
            history.append(delete(n % clients, call, ret, key=key))
        else:
            expected = state[key] if roll < 0.9 else b"stale"
            swapped = expected == state[key]
            if swapped:
                state[key] = b"v%d" % n
            history.append(cas(n % clients, expected, b"v%d" % n, swapped, call, ret, key=key))
    return history


def test_thousands_of_concurrent_operations_check_ok():
    history = _random_concurrent_history(operations=5000, keys=20, clients=8, seed=7)
    result = assert_ok(history)
    assert result.keys_checked == 20
    assert isinstance(result, CheckResult)


def _brute_force_linearizable(history):
    """Return whether a one-key history is linearizable, by trying every order (for tests only)."""
    known = [o for o in history if o.ret is not None]
    optional = [o for o in history if o.ret is None and o.op != "get"]
    for mask in range(1 << len(optional)):
        chosen = known + [o for b, o in enumerate(optional) if mask >> b & 1]
        for order in itertools.permutations(chosen):
            if _legal(order):
                return True
    return False


def _legal(order):
    state = None
    for position, o in enumerate(order):
        if any(later.ret is not None and later.ret < o.call for later in order[position + 1 :]):
            return False
        if o.op == "put":
            state = o.value
        elif o.op == "delete":
            state = None
        elif o.op == "get":
            if o.output != state:
                return False
        elif o.ret is None or o.output:
            if state != o.expected:
                return False
            state = o.value
        elif state == o.expected:
            return False
    return True


@st.composite
def small_random_histories(draw):
    """Draw up to six operations on one key with random outputs, values from a tiny pool."""
    values = st.sampled_from([None, b"a", b"b"])
    history = []
    for client in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["put", "get", "delete", "cas"]))
        call = draw(st.integers(0, 6))
        ret = None if draw(st.integers(0, 3)) == 0 else call + draw(st.integers(0, 4))
        if kind == "put":
            history.append(put(client, draw(values) or b"c", call, ret))
        elif kind == "delete":
            history.append(delete(client, call, ret))
        elif kind == "get":
            history.append(get(client, None if ret is None else draw(values), call, ret))
        else:
            output = None if ret is None else draw(st.booleans())
            history.append(cas(client, draw(values), draw(values) or b"c", output, call, ret))
    return history


@settings(max_examples=1000, deadline=None)
@given(small_random_histories())
def test_checker_agrees_with_brute_force_on_small_histories(history):
    # Values repeat here, so this also covers histories that break the unique-value convention.
    expected = "ok" if _brute_force_linearizable(history) else "violation"
    assert check(history).verdict == expected
