"""The one error table: statuses to typed exceptions, and what a client may retry."""
import grpc
import pytest

from sealkv.node import errors


class FakeRpcError(grpc.RpcError):
    """A failed call as grpc raises it (for tests only)."""

    def __init__(self, code, details, metadata=()):
        self._code, self._details, self._metadata = code, details, metadata

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._metadata


SERVER = ((errors.SERVER_METADATA_KEY, "unavailable"),)


def test_unavailable_said_by_the_node_means_nothing_was_submitted():
    e = errors.from_rpc_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "no leader", SERVER))
    assert type(e) is errors.Unavailable


def test_unavailable_because_no_connection_could_be_made_means_nothing_was_submitted():
    e = errors.from_rpc_error(FakeRpcError(
        grpc.StatusCode.UNAVAILABLE,
        "failed to connect to all addresses; last error: Connection refused"))
    assert type(e) is errors.Unavailable


@pytest.mark.parametrize("details", ["Socket closed", "Connection reset by peer", ""])
def test_unavailable_after_the_connection_broke_is_outcome_unknown(details):
    e = errors.from_rpc_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE, details))
    assert isinstance(e, errors.OutcomeUnknown)


def test_client_side_deadline_is_outcome_unknown():
    e = errors.from_rpc_error(FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                           "Deadline Exceeded"))
    assert isinstance(e, errors.OutcomeUnknown)


def test_not_leader_carries_the_leader_address():
    e = errors.from_rpc_error(FakeRpcError(
        grpc.StatusCode.FAILED_PRECONDITION, "not the leader",
        SERVER + ((errors.LEADER_METADATA_KEY, "127.0.0.1:9"),)))
    assert isinstance(e, errors.NotLeader) and e.leader == "127.0.0.1:9"


@pytest.mark.parametrize("cls", [errors.InvalidArgument, errors.NotFound, errors.AlreadyExists,
                                 errors.FailedPrecondition, errors.Aborted,
                                 errors.ResourceExhausted, errors.IntegrityError,
                                 errors.PermissionDenied, errors.Unauthenticated,
                                 errors.Unimplemented, errors.Internal])
def test_every_server_error_maps_back_to_its_type(cls):
    e = errors.from_rpc_error(FakeRpcError(cls.code, "m", SERVER))
    assert type(e) is cls and e.message == "m"


@pytest.mark.parametrize("metadata", [(), SERVER])
def test_a_read_that_times_out_is_a_read_timeout_not_an_unknown_outcome(metadata):
    e = errors.from_rpc_error(FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                           "Deadline Exceeded", metadata), read=True)
    assert type(e) is errors.ReadTimeout
    assert not isinstance(e, errors.OutcomeUnknown)
    assert e.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_read_whose_connection_broke_is_unavailable():
    e = errors.from_rpc_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "Socket closed"),
                              read=True)
    assert type(e) is errors.Unavailable and "read" in e.message


def test_a_server_certificate_this_client_does_not_trust_is_unauthenticated():
    e = errors.from_rpc_error(FakeRpcError(
        grpc.StatusCode.UNAVAILABLE,
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Tls "
        "handshake failed (TSI_PROTOCOL_FAILURE): CERTIFICATE_VERIFY_FAILED"))
    assert type(e) is errors.Unauthenticated and "--cacert" in e.message
