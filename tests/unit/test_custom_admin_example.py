"""The example admin plugin's pure parts: the digest comparison, and its generated protos.

Both are loaded from examples/custom_admin by path, so these tests need no install.
"""
import importlib
import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "custom_admin"
PACKAGE = EXAMPLE / "sealkv_consistency_admin"


def _load(name: str, path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


check = _load("sealkv_consistency_admin_check", PACKAGE / "check.py")
State, Verdict = check.MemberState, check.Verdict


def answer(name, index=10, digest="d1", reachable=True, reason=""):
    return check.MemberAnswer(name, f"127.0.0.1:{9000 + int(name[1:])}", "voter", reachable,
                              reason, index, digest, 3)


def states(report):
    return {m.answer.name: m.state for m in report.members}


def test_all_members_at_one_index_with_one_digest_are_consistent():
    report = check.compare([answer("n1"), answer("n2"), answer("n3")], target_index=10)
    assert report.verdict is Verdict.CONSISTENT
    assert (report.compared_index, report.agreed_digest) == (10, "d1")
    assert set(states(report).values()) == {State.AGREES}
    assert report.summary() == "consistent: all 3 members agree at index 10"


def test_the_odd_digest_out_disagrees():
    report = check.compare([answer("n1"), answer("n2", digest="d2"), answer("n3")], 10)
    assert report.verdict is Verdict.INCONSISTENT
    assert states(report) == {"n1": State.AGREES, "n2": State.DISAGREES, "n3": State.AGREES}
    assert "n2 disagree" in report.summary()


def test_without_a_majority_digest_no_member_agrees():
    report = check.compare([answer("n1"), answer("n2", digest="d2"),
                            answer("n3", reachable=False, reason="unreachable: refused")], 10)
    assert report.verdict is Verdict.INCONSISTENT
    assert report.agreed_digest == ""
    assert states(report) == {"n1": State.DISAGREES, "n2": State.DISAGREES,
                              "n3": State.UNREACHABLE}


def test_an_unreachable_member_makes_the_check_incomplete_and_keeps_its_reason():
    report = check.compare([answer("n1"), answer("n2"),
                            answer("n3", reachable=False, reason="unreachable: refused")], 10)
    assert report.verdict is Verdict.INCOMPLETE
    assert report.members[2].reason == "unreachable: refused"
    assert report.summary() == "incomplete: n3 could not be compared"


def test_members_behind_the_target_or_elsewhere_are_not_compared():
    report = check.compare([answer("n1", index=12), answer("n2", index=12),
                            answer("n3", index=9), answer("n4", index=13)], target_index=10)
    assert report.compared_index == 12
    assert states(report) == {"n1": State.AGREES, "n2": State.AGREES,
                              "n3": State.NOT_COMPARED, "n4": State.NOT_COMPARED}
    assert "behind the target 10" in report.members[2].reason
    assert report.verdict is Verdict.INCOMPLETE


def test_a_tie_between_indexes_compares_at_the_highest():
    assert check.compared_index([answer("n1", 11), answer("n2", 12)], 10) == 12
    assert check.compared_index([answer("n1", 9)], 10) is None


@pytest.mark.parametrize("answers, target, expected", [
    ([answer("n1", 10), answer("n2", 10)], 10, True),
    ([answer("n1", 10), answer("n2", 11)], 10, False),   # still applying
    ([answer("n1", 9), answer("n2", 9)], 10, False),     # behind the target
    ([answer("n1", 10), answer("n2", 3, reachable=False)], 10, True),  # not waited for
    ([answer("n1", reachable=False)], 10, True),
])
def test_settled(answers, target, expected):
    assert check.settled(answers, target) is expected


def test_no_members_is_incomplete():
    report = check.compare([], 10)
    assert report.verdict is Verdict.INCOMPLETE
    assert "no members" in report.summary()


def test_generated_modules_are_fresh(tmp_path):
    _load("sealkv_consistency_generate", EXAMPLE / "generate_proto.py").generate(out_dir=tmp_path)
    fresh = {p.relative_to(tmp_path).as_posix(): p.read_bytes()
             for p in tmp_path.rglob("*_pb2*.py")}
    committed = {p.relative_to(EXAMPLE).as_posix(): p.read_bytes()
                 for p in (PACKAGE / "v1").glob("*_pb2*.py")}
    assert fresh, "generate_proto.py produced no modules"
    stale = sorted(n for n in fresh.keys() | committed.keys() if fresh.get(n) != committed.get(n))
    assert not stale, (f"the example's generated modules are stale: {', '.join(stale)}; run "
                       "`python examples/custom_admin/generate_proto.py` and commit the result")


def test_the_example_declares_the_role_of_every_method(monkeypatch):
    from sealkv.node import plugin_loader

    monkeypatch.syspath_prepend(str(EXAMPLE))
    admin = importlib.import_module("sealkv_consistency_admin.admin")
    rules = plugin_loader.method_rules("consistency", admin.ConsistencyAdminPlugin,
                                       [admin.SERVICE_NAME])
    assert {path: rule.role for path, rule in rules.items()} == {
        f"/{admin.SERVICE_NAME}/CheckConsistency": "admin"}
