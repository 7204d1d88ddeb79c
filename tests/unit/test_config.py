"""Node configuration: parsing, validation messages that say what to change, secrets."""
import os
import re

import pytest

from sealkv.node.state import commands as cmd
from sealkv.node.config import (ConfigError, build_config, format_initial_cluster, load_toml,
                                parse_initial_cluster)
from sealkv.node.replication.settings import RaftSettings
from sealkv.node.replication.membership import MemberRecord

CLUSTER = "n1=127.0.0.1:7001/127.0.0.1:9001,n2=127.0.0.1:7002/127.0.0.1:9002"


def values(**overrides):
    base = {"name": "n1", "grpc": "127.0.0.1:9001", "data_dir": "/tmp/sealkv-n1",
            "raft": "127.0.0.1:7001", "initial_cluster": CLUSTER, "insecure": True}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


# -- initial cluster ----------------------------------------------------------------------


def test_parse_initial_cluster_voters_and_learner():
    members = parse_initial_cluster(CLUSTER + ", l1=learner/127.0.0.1:9009 ,")
    assert members == [
        MemberRecord("n1", "127.0.0.1:7001", "127.0.0.1:9001", cmd.ROLE_VOTER),
        MemberRecord("n2", "127.0.0.1:7002", "127.0.0.1:9002", cmd.ROLE_VOTER),
        MemberRecord("l1", "", "127.0.0.1:9009", cmd.ROLE_LEARNER),
    ]


@pytest.mark.parametrize("text", [
    CLUSTER,
    "a=h1:1/h2:2",
    "x.y_z-1=[::1]:7001/[::1]:9001,l=learner/localhost:9",
])
def test_initial_cluster_format_round_trip(text):
    members = parse_initial_cluster(text)
    assert format_initial_cluster(members) == text
    assert parse_initial_cluster(format_initial_cluster(members)) == members


@pytest.mark.parametrize("text, message", [
    ("n1", "must be NAME=RAFT_HOST:PORT/GRPC_HOST:PORT"),
    ("n1=127.0.0.1:7001", "must be NAME=RAFT_HOST:PORT/GRPC_HOST:PORT"),
    ("=127.0.0.1:7001/127.0.0.1:9001", "member name must be"),
    ("bad name=127.0.0.1:7001/127.0.0.1:9001", "member name must be"),
    ("n1=127.0.0.1/127.0.0.1:9001", "member n1 raft address"),
    ("n1=127.0.0.1:7001/127.0.0.1:0", "member n1 grpc address"),
    ("n1=127.0.0.1:70000/127.0.0.1:9001", "member n1 raft address"),
    ("n1=:7001/127.0.0.1:9001", "member n1 raft address"),
])
def test_bad_initial_cluster_entries(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_initial_cluster(text)


def test_duplicate_member_names_are_refused():
    with pytest.raises(ConfigError, match="names a member twice"):
        parse_initial_cluster("n1=h:1/h:2,n1=h:3/h:4")


# -- build_config -------------------------------------------------------------------------


def test_build_config_valid():
    config = build_config(values(raft_settings={"log_compaction_min_entries": 100}))
    assert config.name == "n1" and config.raft == "127.0.0.1:7001"
    assert config.partners == ["127.0.0.1:7002"]
    assert config.raft_settings.log_compaction_min_entries == 100


def test_build_config_from_toml(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text(f'name = "n1"\ngrpc = "127.0.0.1:9001"\ndata_dir = "{tmp_path}"\n'
                    f'raft = "127.0.0.1:7001"\ninitial_cluster = "{CLUSTER}"\n'
                    'cacert = "/pki/ca.crt"\ncert = "/pki/node.n1.crt"\nkey = "/pki/node.n1.key"\n'
                    "[raft_settings]\nlog_compaction_min_entries = 7\n")
    config = build_config(load_toml(str(path)))
    assert config.raft_settings.log_compaction_min_entries == 7
    assert config.tls_files.key == "/pki/node.n1.key"


def test_unreadable_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("name = \n")
    with pytest.raises(ConfigError, match="broken.toml"):
        load_toml(str(path))


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match="unknown configuration keys: colour, raft_port"):
        build_config(values(raft_port=1, colour="red"))
    with pytest.raises(ConfigError, match="unknown raft_settings keys: heartbeat"):
        build_config(values(raft_settings={"heartbeat": 1}))


@pytest.mark.parametrize("missing", ["name", "grpc", "data_dir"])
def test_required_keys(missing):
    with pytest.raises(ConfigError, match=f"{missing} is required"):
        build_config(values(**{missing: None}))


def test_voter_needs_raft_address():
    with pytest.raises(ConfigError, match="--raft HOST:PORT is required"):
        build_config(values(raft=None, initial_cluster=None))


def test_learner_with_raft_address_is_refused():
    with pytest.raises(ConfigError, match="a learner has no raft address"):
        build_config(values(learner=True))


def test_learner_needs_voters_to_follow():
    with pytest.raises(ConfigError, match="learner needs --initial-cluster"):
        build_config(values(raft=None, learner=True, initial_cluster=None))


def test_learner_config_is_valid_without_raft():
    config = build_config(values(name="l1", grpc="127.0.0.1:9009", raft=None, learner=True))
    assert config.learner and config.partners == ["127.0.0.1:7001", "127.0.0.1:7002"]


@pytest.mark.parametrize("overrides", [
    {"name": "n3"},                       # not listed at all
    {"raft": "127.0.0.1:7999"},           # listed with another raft address
])
def test_node_must_be_listed_in_its_initial_cluster(overrides):
    with pytest.raises(ConfigError, match="--initial-cluster must list this node as"):
        build_config(values(**overrides))


@pytest.mark.parametrize("overrides, message", [
    ({"grpc": "localhost"}, "grpc address 'localhost' must be HOST:PORT"),
    ({"name": "n 1"}, "name must be"),
    ({"request_timeout": 0}, "request_timeout must be positive"),
    ({"fsync": "sometimes"}, "fsync must be always or never"),
    ({"batch_entries": "no"}, "batch_entries must be true or false"),
    ({"peer_wire": "aes"}, "peer_wire must be gcm or fernet"),
    ({"raft_settings": {"log_compaction_min_bytes": 10}}, "log_compaction_min_bytes"),
    ({"raft_settings": {"raft_max_timeout": 0.1}}, "raft.max_timeout must exceed"),
])
def test_invalid_values_name_the_setting(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config(values(**overrides))


# -- secrets ------------------------------------------------------------------------------


def write_secret(path, text, mode):
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


LONG_SECRET = "0123456789abcdef-0123456789abcdef-secret"


def test_read_secret_accepts_a_private_file(tmp_path):
    path = write_secret(tmp_path / "secret", f"  {LONG_SECRET}\n", 0o600)
    config = build_config(values(secret_file=path))
    assert config.read_secret() == LONG_SECRET


def test_no_secret_file_means_no_secret():
    assert build_config(values()).read_secret() is None


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_read_secret_refuses_a_file_others_can_read(tmp_path, mode):
    path = write_secret(tmp_path / "secret", LONG_SECRET, mode)
    with pytest.raises(ConfigError, match=re.escape(f"readable by group or others: run chmod 600 {path}")):
        build_config(values(secret_file=path)).read_secret()


def test_read_secret_refuses_a_short_secret(tmp_path):
    path = write_secret(tmp_path / "secret", "short\n", 0o600)
    with pytest.raises(ConfigError, match=re.escape(f"{path} holds fewer than 32 bytes")):
        build_config(values(secret_file=path)).read_secret()


def test_a_new_cluster_refuses_a_secret_under_32_bytes_an_existing_one_keeps_16(tmp_path):
    path = write_secret(tmp_path / "secret", "0123456789abcdef-secret\n", 0o600)
    config = build_config(values(secret_file=path))
    with pytest.raises(ConfigError, match="fewer than 32 bytes"):
        config.read_secret()
    assert config.read_secret(existing=True) == "0123456789abcdef-secret"


# -- TLS ----------------------------------------------------------------------------------


def test_tls_is_the_default_and_needs_three_files():
    with pytest.raises(ConfigError, match="mutual TLS by default.*--insecure"):
        build_config(values(insecure=None))
    with pytest.raises(ConfigError, match="mutual TLS by default"):
        build_config(values(insecure=None, cacert="ca.crt", cert="n1.crt"))
    config = build_config(values(insecure=None, cacert="ca.crt", cert="n1.crt", key="n1.key"))
    assert config.tls_files.cert == "n1.crt"


def test_insecure_with_certificates_is_contradictory():
    with pytest.raises(ConfigError, match="drop --cacert"):
        build_config(values(cacert="ca.crt", cert="n1.crt", key="n1.key"))
    assert build_config(values()).tls_files is None


def test_read_secret_names_a_missing_file(tmp_path):
    path = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match=re.escape(f"cannot open secret file {path}")):
        build_config(values(secret_file=path)).read_secret()


def test_read_secret_refuses_a_directory(tmp_path):
    os.chmod(tmp_path, 0o700)
    with pytest.raises(ConfigError, match="not a regular file"):
        build_config(values(secret_file=str(tmp_path))).read_secret()


# -- raft settings ------------------------------------------------------------------------


def test_default_raft_settings_are_valid():
    RaftSettings().validate()


@pytest.mark.parametrize("overrides, message", [
    ({"raft_min_timeout": 0.1, "append_entries_period": 0.05}, "raft.min_timeout must exceed 3"),
    ({"raft_max_timeout": 0.6}, "raft.max_timeout must exceed raft.min_timeout"),
    ({"connection_timeout": 1.0}, "raft.connection_timeout must be at least"),
    ({"leader_fallback_timeout": 0.05}, "raft.leader_fallback_timeout must exceed"),
    ({"log_compaction_min_entries": 1}, "raft.log_compaction_min_entries must be at least 2"),
    ({"auto_tick_period": 0}, "raft.auto_tick_period must be positive"),
    ({"connection_retry_time": -1}, "raft.connection_retry_time must be positive"),
    ({"log_compaction_min_time": 0}, "raft.log_compaction_min_time must be positive"),
])
def test_raft_settings_validate_raises_value_error(overrides, message):
    # ValueError, not AssertionError: the check survives `python -O`.
    with pytest.raises(ValueError, match=message) as info:
        RaftSettings(**overrides).validate()
    assert not isinstance(info.value, AssertionError)


# -- the fsync policy through `cluster up` ---------------------------------------------


def test_cluster_up_passes_fsync_never_and_records_it(tmp_path):
    from sealkv.node.cli import local
    from sealkv.node.cli.cluster_cmd import _node_args

    node = local.LocalNode("n1", "127.0.0.1:7001", "127.0.0.1:9001", str(tmp_path / "n1"),
                           str(tmp_path / "n1.log"))
    default = local.LocalCluster(str(tmp_path), str(tmp_path / "secret"), nodes=[node])
    assert "--fsync" not in _node_args(default, node)
    never = local.LocalCluster(str(tmp_path), str(tmp_path / "secret"), nodes=[node],
                               fsync="never")
    args = _node_args(never, node)
    assert args[args.index("--fsync") + 1] == "never"
    never.save()
    assert local.LocalCluster.load(str(tmp_path)).fsync == "never"


def test_cluster_up_passes_peer_wire_and_reads_records_without_it(tmp_path):
    import json

    from sealkv.node.cli import local
    from sealkv.node.cli.cluster_cmd import _node_args

    node = local.LocalNode("n1", "127.0.0.1:7001", "127.0.0.1:9001", str(tmp_path / "n1"),
                           str(tmp_path / "n1.log"))
    record = local.LocalCluster(str(tmp_path), str(tmp_path / "secret"), nodes=[node])
    assert "--peer-wire" not in _node_args(record, node)  # the node's default (gcm)
    record.peer_wire = "fernet"
    args = _node_args(record, node)
    assert args[args.index("--peer-wire") + 1] == "fernet"
    record.save()
    path = tmp_path / local.RECORD
    raw = json.loads(path.read_text())
    del raw["peer_wire"]  # a record written before the setting existed
    path.write_text(json.dumps(raw))
    assert local.LocalCluster.load(str(tmp_path)).peer_wire is None


def test_a_node_sends_gcm_unless_told_otherwise():
    assert build_config(values()).peer_wire == "gcm"
    assert build_config(values(peer_wire="fernet")).peer_wire == "fernet"


@pytest.mark.parametrize("address", ["10.0.0.5:7001", "[::1]:9001", "node-1.example.com:9001",
                                     "localhost:1"])
def test_member_addresses_peers_can_dial_are_accepted(address):
    from sealkv.node.config import check_member_address

    check_member_address(address, "grpc")


@pytest.mark.parametrize("address, message", [
    ("0.0.0.0:9001", "wildcard"), ("[::]:9001", "wildcard"), ("224.0.0.1:9001", "multicast"),
    ("*:9001", "IP address or a DNS name"), ("bad host:9001", "IP address or a DNS name"),
    ("h:0", "HOST:PORT"), ("h:65536", "HOST:PORT"), ("h", "HOST:PORT"), (":9001", "HOST:PORT"),
])
def test_member_addresses_that_cannot_be_dialled_are_refused(address, message):
    from sealkv.node.config import check_member_address

    with pytest.raises(ConfigError, match=message):
        check_member_address(address, "grpc")
