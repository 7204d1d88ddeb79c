"""The Raft rules sealkv enforces around pysyncobj 0.3.17's message handling.

Stock pysyncobj 0.3.17 departs from the Raft paper in ways that show up under load (issue #15):

- A follower that receives entries below its last one deletes everything after `prevLogIdx`,
  matching or not, reverses the membership changes among them and appends the message's
  entries again ("truncating already-applied log entries ... may have diverged" at CRITICAL).
  Here the follower keeps entries it already has with the same index and term, truncates only
  from the first entry whose term conflicts, halts if that entry is at or below its commit
  index (a safety violation, never repaired silently), and reverses membership changes only
  for entries really removed (`plan_append`, Raft paper §5.3).
- The leader advances a follower's next index when it sends, then on every successful reply
  sets it back to the index that reply acknowledges, so pipelined messages are sent twice.
  Here a success never moves the next index backwards (etcd-io/raft `Progress.MaybeUpdate`);
  after a rejection the follower is probed with one message at a time until a reply says where
  its log matches, then replication pipelines again (etcd-io/raft's probe/replicate states).
  Rejections back off as pysyncobj does (to the follower's hint); stale ones are ignored.

- A node whose election timeout passes raises its term and starts an election at once, so a
  follower cut off from the others comes back with a higher term and deposes a healthy
  leader. Here it first asks for pre-votes for the next term without raising its own
  (PreVote, Ongaro's thesis §9.6, etcd-io/raft `PreVote`): only when a quorum would vote
  for it does it become a candidate. A voter grants neither a pre-vote nor a vote while it
  has heard from a leader within the minimum election timeout (thesis §4.2.3), nor does a
  leader (CheckQuorum: a leader steps down when it has not heard from a quorum within
  `leaderFallbackTimeout`, which sealkv sets to the maximum election timeout). A leadership
  transfer's election skips PreVote and carries `transfer`, which overrides that rule.
- A follower answers every AppendEntries, also the empty one a leader sends right after each
  commit only to carry the new commit index, so a lone write costs every follower a second
  reply and the leader a second message to open and dispatch per follower. Here a follower
  leaves an empty AppendEntries unanswered when its answer would repeat, to the same leader
  in the same term, the success it sent less than `appendEntriesPeriod` ago (same next
  index): such a reply tells the leader nothing but that the follower is alive, which the
  next heartbeat's answer tells within two periods, far inside `leaderFallbackTimeout`.
  Rejections, entries and the first answer to a new leader or term are always answered.
- A node that ignores AppendEntries of a lower term never tells that leader; a node whose
  term rose (it lost an election) would be cut off until the leader fails. Here it answers
  `stale_term` with its term, and the leader steps down (etcd-io/raft answers such messages).

`RaftRulesSyncObj` is a `SyncObj` whose message handler and AppendEntries sender apply these
rules; the replication adapter's `_RaftObject` derives from it. Everything runs on pysyncobj's
tick thread. The rules touch the journal only through the interface pysyncobj itself uses
(`journal[i]`, `len`, `add`, `deleteEntriesFrom`, `setRaftCommitIndex`), so any journal that
serves pysyncobj serves them.

Wire compatibility (rolling upgrades from stock pysyncobj or an older sealkv): every message is
a dict of ints, bools and strings, which the whitelist unpickler accepts. Rejections carry one
extra key, `rejected` (the `prevLogIdx` they refuse), which stock leaders ignore; replies
without it (from stock followers) are handled as pysyncobj handles them. `request_vote` may
carry `transfer`, which stock nodes ignore. `pre_vote`, `pre_vote_response` and `stale_term`
are new types, which stock nodes ignore (pysyncobj dispatches on known types only): a node
with these rules gets no pre-votes from stock nodes, so it becomes a candidate only once a
quorum runs these rules; stock nodes still campaign as before and are voted for, so a cluster
keeps electing leaders during an upgrade as long as one stock voter with an up-to-date log is
up. Upgrade one node at a time, as always.

Only `sealkv.node.replication.adapter` imports this module (it is part of the pysyncobj boundary).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

from pysyncobj import SyncObj
from pysyncobj.monotonic import monotonic as monotonic_time
from pysyncobj.syncobj import _RAFT_STATE

log = logging.getLogger(__name__)

# A journal entry as pysyncobj stores it: (command bytes, raft index, term).
Entry = tuple


class CommittedConflict(Exception):
    """A leader sent an entry whose term differs from a committed entry of this replica."""

    def __init__(self, index: int, commit_index: int):
        super().__init__(f"the leader's entry {index} conflicts with this replica's entry, "
                         f"which is committed (commit index {commit_index})")
        self.index = index
        self.commit_index = commit_index


class MalformedAppend(ValueError):
    """An AppendEntries message whose entries do not follow `prevLogIdx` one by one."""


@dataclass(frozen=True)
class AppendPlan:
    """What a follower does with the entries of an AppendEntries whose previous entry matched.

    `truncate_from` is the raft index of the first entry to delete (every entry from it on
    goes), or None when nothing is deleted; `append` are the message's entries to add after
    that; `last_index` is the last index the message vouches for: the follower acknowledges
    it, and may advance its commit index up to it and no further.
    """

    truncate_from: Optional[int]
    append: tuple
    last_index: int


def plan_append(journal, prev_index: int, entries: Sequence[Entry],
                commit_index: int) -> AppendPlan:
    """Decides how a follower reconciles `entries` with its journal (Raft paper §5.3).

    The caller has checked that the journal holds `prev_index` with the message's
    `prevLogTerm`. Entries the journal already holds with the same index and term are
    skipped; the journal is truncated only from the first entry whose term differs, and the
    rest of the message is appended after it. Pure: reads `journal` (pysyncobj's interface:
    `journal[0]`, `journal[-1]`, `journal[position]`), changes nothing.

    Raises `CommittedConflict` when the first conflicting entry is at or below
    `commit_index` (the caller halts), `MalformedAppend` when the entries do not follow
    `prev_index` one by one.
    """
    for offset, entry in enumerate(entries):
        if entry[1] != prev_index + 1 + offset:
            raise MalformedAppend(f"entry at position {offset} has index {entry[1]}, "
                                  f"expected {prev_index + 1 + offset}")
    last_index = prev_index + len(entries)
    first = journal[0][1]
    last = journal[-1][1]
    for offset, entry in enumerate(entries):
        index, term = entry[1], entry[2]
        if index > last:
            return AppendPlan(None, tuple(entries[offset:]), last_index)
        if journal[index - first][2] == term:
            continue
        if index <= commit_index:
            raise CommittedConflict(index, commit_index)
        return AppendPlan(index, tuple(entries[offset:]), last_index)
    return AppendPlan(None, (), last_index)


class RaftRulesSyncObj(SyncObj):
    """A `SyncObj` that handles AppendEntries and their replies by the rules above.

    Subclasses implement `_on_safety_violation(reason)`, called on the tick thread when this
    replica must stop (it must not return into more Raft work: the adapter halts the
    process; a test's recorder may return, after which this object ignores AppendEntries).
    """

    def __init__(self, *args, **kwargs):
        self._rules_halted = False
        # Leader side, per follower node: nodes in the probe state, and the probes awaiting
        # a reply (node -> the time after which the probe may be sent again).
        self._probing: set = set()
        self._probe_wait: dict = {}
        # Elections: when this node last heard from a leader (monotonic), the term of the
        # pre-vote round in progress, the voters that granted it, and whether one was won.
        self._leader_contact = 0.0
        self._pre_vote_term: Optional[int] = None
        self._pre_votes: set = set()
        self._pre_vote_won = False
        # Follower: the last success answered (leader node, term, next index, monotonic time).
        self._last_success: Optional[tuple] = None
        super().__init__(*args, **kwargs)

    def _on_safety_violation(self, reason: str) -> None:
        raise NotImplementedError

    # -- dispatch (tick thread) --------------------------------------------------------

    def _SyncObj__onMessageReceived(self, node, message):
        kind = message.get('type')
        if kind == 'append_entries':
            if message['term'] < self._SyncObj__raftCurrentTerm:
                self._SyncObj__transport.send(node, {
                    'type': 'stale_term', 'term': self._SyncObj__raftCurrentTerm})
                return
            self._leader_contact = monotonic_time()
            self._pre_vote_term = None
            self._pre_vote_won = False
            if 'prevLogIdx' in message and 'transmission' not in message:
                self._receive_append(node, message)
                return
        elif kind == 'next_node_idx':
            if self._SyncObj__raftState == _RAFT_STATE.LEADER:
                self._receive_progress(node, message)
            return
        elif kind == 'request_vote':
            if not message.get('transfer') and self._in_lease():
                return  # a live leader is known: this candidate would only disrupt it
            log.info("%s asks for a vote for raft term %d (ours: %d)", _address(node),
                     message['term'], self._SyncObj__raftCurrentTerm)
        elif kind == 'pre_vote':
            self._receive_pre_vote(node, message)
            return
        elif kind == 'pre_vote_response':
            self._receive_pre_vote_response(node, message)
            return
        elif kind == 'stale_term':
            self._receive_stale_term(message)
            return
        SyncObj._SyncObj__onMessageReceived(self, node, message)

    # -- follower: AppendEntries -------------------------------------------------------

    def _receive_append(self, node, message) -> None:
        if self._rules_halted:
            return
        self._follow(node, message['term'])
        self._SyncObj__leaderCommitIndex = leader_commit = message['commit_index']
        prev_index, prev_term = message['prevLogIdx'], message['prevLogTerm']
        entries = message.get('entries', [])
        journal = self._SyncObj__raftLog

        prev = self._SyncObj__getEntries(prev_index, 1)
        if not prev:
            # Missing (beyond our last entry, or compacted away): hint our last index + 1.
            self._reply_progress(node, journal[-1][1] + 1, success=False, rejected=prev_index)
            return
        if prev[0][2] != prev_term:
            self._reply_progress(node, prev_index, success=False, rejected=prev_index)
            return
        commit = self._SyncObj__raftCommitIndex
        try:
            plan = plan_append(journal, prev_index, entries, commit)
        except CommittedConflict as exc:
            self._rules_halted = True
            self._on_safety_violation(f"raft log conflict at or below the commit index: {exc}")
            return
        except MalformedAppend as exc:
            log.warning("refused an AppendEntries from %s: %s", node, exc)
            self._reply_progress(node, prev_index + 1, success=False, rejected=prev_index)
            return

        dynamic = self._SyncObj__conf.dynamicMembershipChange
        if plan.truncate_from is not None:
            removed = self._SyncObj__getEntries(plan.truncate_from)
            log.info("replacing %d uncommitted raft entries from index %d (term conflict "
                     "with the leader)", len(removed), plan.truncate_from)
            if dynamic:
                for entry in reversed(removed):
                    change = self._SyncObj__parseChangeClusterRequest(entry[0])
                    if change is not None:
                        self._SyncObj__doChangeCluster(change, reverse=True)
            self._SyncObj__deleteEntriesFrom(plan.truncate_from)
        for entry in plan.append:
            journal.add(*entry)
        if dynamic:
            for entry in plan.append:
                change = self._SyncObj__parseChangeClusterRequest(entry[0])
                if change is not None:
                    self._SyncObj__doChangeCluster(change)

        # Commit only what this message vouched for: entries after `last_index` may be an
        # old term's leftovers this leader has not checked yet (pysyncobj used its last index).
        if leader_commit > commit:
            commit = min(leader_commit, plan.last_index)
            self._SyncObj__raftCommitIndex = commit
        journal.setRaftCommitIndex(self._SyncObj__raftCommitIndex)
        if not entries and self._repeats_recent_success(node, plan.last_index + 1):
            return
        self._reply_progress(node, plan.last_index + 1, success=True)

    def _repeats_recent_success(self, node, next_index: int) -> bool:
        last = self._last_success
        return (last is not None and last[0] == node
                and last[1] == self._SyncObj__raftCurrentTerm and last[2] == next_index
                and monotonic_time() - last[3] < self._SyncObj__conf.appendEntriesPeriod)

    def _follow(self, node, term: int) -> None:
        """pysyncobj's reaction to any AppendEntries of the current or a newer term."""
        if term > self._SyncObj__raftCurrentTerm:
            # A new leader at a higher term supersedes any pending transfer.
            self._SyncObj__transferInProgress = False
        if not self._SyncObj__transferInProgress:
            self._SyncObj__raftElectionDeadline = (monotonic_time()
                                                   + self._SyncObj__generateRaftTimeout())
        if self._SyncObj__raftLeader != node:
            log.info("following the leader at %s (raft term %d)", _address(node), term)
            self._SyncObj__onLeaderChanged()
        self._SyncObj__raftLeader = node
        if term > self._SyncObj__raftCurrentTerm:
            self._SyncObj__setCurrentTerm(term, None)
        self._SyncObj__setState(_RAFT_STATE.FOLLOWER)

    def _reply_progress(self, node, next_index: int, *, success: bool,
                        rejected: Optional[int] = None) -> None:
        message = {'type': 'next_node_idx', 'next_node_idx': next_index,
                   'reset': not success, 'success': success}
        if rejected is not None:
            message['rejected'] = rejected
        self._last_success = (node, self._SyncObj__raftCurrentTerm, next_index,
                              monotonic_time()) if success else None
        self._SyncObj__transport.send(node, message)

    # -- leader: replies ---------------------------------------------------------------

    def _receive_progress(self, node, message) -> None:
        self._SyncObj__lastResponseTime[node] = monotonic_time()
        next_index = self._SyncObj__raftNextIndex
        match_index = self._SyncObj__raftMatchIndex
        if node not in next_index:
            return  # removed from the cluster meanwhile
        hint = message['next_node_idx']
        if message['success']:
            self._probe_wait.pop(node, None)
            self._probing.discard(node)
            if hint - 1 > match_index[node]:
                match_index[node] = hint - 1
            if hint > next_index[node]:
                next_index[node] = hint
            return
        if not message['reset']:
            return  # a chunk of a large entry was received
        rejected = message.get('rejected')
        probing = node in self._probing
        if rejected is not None:
            if probing and rejected != next_index[node] - 1:
                return  # answers an earlier probe
            if not probing and rejected < match_index[node]:
                return  # answers a message sent before a later success
        self._probe_wait.pop(node, None)
        if hint <= match_index[node]:
            # The follower no longer holds entries it acknowledged (it restarted without
            # them): believe it, or it is never caught up again.
            log.warning("follower %s lost raft entries it had acknowledged (up to %d, now "
                        "%d); resending them", node, match_index[node], hint - 1)
            match_index[node] = max(0, hint - 1)
        next_index[node] = max(1, hint)
        self._probing.add(node)

    def _SyncObj__onBecomeLeader(self):
        log.info("leading at raft term %d", self._SyncObj__raftCurrentTerm)
        self._probing.clear()
        self._probe_wait.clear()
        SyncObj._SyncObj__onBecomeLeader(self)

    # -- leader: sending ---------------------------------------------------------------

    def _SyncObj__sendAppendEntries(self):
        """pysyncobj's sender, with the probe state: one message at a time to a follower
        whose log position is being searched, pipelined messages to the others."""
        conf = self._SyncObj__conf
        now = monotonic_time()
        self._SyncObj__newAppendEntriesTime = now + conf.appendEntriesPeriod
        journal = self._SyncObj__raftLog
        transport = self._SyncObj__transport
        next_index = self._SyncObj__raftNextIndex
        connected = self._SyncObj__connectedNodes
        serializer = self._SyncObj__serializer
        batch_bytes = conf.appendEntriesBatchSizeBytes

        for node in self._SyncObj__otherNodes | self._SyncObj__readonlyNodes:
            if node not in connected:
                serializer.cancelTransmisstion(node)
                continue
            probing = node in self._probing
            if probing and self._probe_wait.get(node, 0) > now:
                continue
            send_single = True
            sending_snapshot = False
            while (next_index[node] <= journal[-1][1] or send_single or sending_snapshot):
                nxt = next_index[node]
                if nxt > journal[0][1]:
                    prev_index, prev_term = self._SyncObj__getPrevLogIndexTerm(nxt)
                    entries = []
                    if nxt <= journal[-1][1]:
                        entries = self._SyncObj__getEntries(nxt, None, batch_bytes)
                        if not probing:
                            next_index[node] = entries[-1][1] + 1
                    if len(entries) == 1 and len(entries[0][0]) >= batch_bytes:
                        self._send_chunked(node, entries[0], prev_index, prev_term)
                    else:
                        transport.send(node, {
                            'type': 'append_entries',
                            'term': self._SyncObj__raftCurrentTerm,
                            'commit_index': self._SyncObj__raftCommitIndex,
                            'entries': entries,
                            'prevLogIdx': prev_index,
                            'prevLogTerm': prev_term,
                        })
                    if probing:
                        self._probe_wait[node] = now + conf.appendEntriesPeriod
                        break
                    if node not in connected:
                        break
                else:
                    data = serializer.getTransmissionData(node)
                    transport.send(node, {
                        'type': 'append_entries',
                        'term': self._SyncObj__raftCurrentTerm,
                        'commit_index': self._SyncObj__raftCommitIndex,
                        'serialized': data,
                    })
                    if node not in connected:
                        break
                    sending_snapshot = data is not None and not data[2]
                    if data is not None and data[2]:
                        next_index[node] = journal[1][1] + 1
                        # The follower answers the installed snapshot with its position.
                        self._probing.discard(node)
                send_single = False
                if monotonic_time() - now > conf.appendEntriesPeriod:
                    break

    def _send_chunked(self, node, entry, prev_index, prev_term) -> None:
        """pysyncobj's path for one entry at or above the batch size (kept as it is)."""
        from pysyncobj import pickle
        batch_bytes = self._SyncObj__conf.appendEntriesBatchSizeBytes
        data = pickle.dumps(entry)
        for pos in range(0, len(data), batch_bytes):
            if pos == 0:
                transmission = 'start'
            elif pos + batch_bytes >= len(entry[0]):
                transmission = 'finish'
            else:
                transmission = 'process'
            self._SyncObj__transport.send(node, {
                'type': 'append_entries',
                'transmission': transmission,
                'data': data[pos:pos + batch_bytes],
                'term': self._SyncObj__raftCurrentTerm,
                'commit_index': self._SyncObj__raftCommitIndex,
                'prevLogIdx': prev_index,
                'prevLogTerm': prev_term,
            })
            if node not in self._SyncObj__connectedNodes:
                break

    # -- elections: PreVote and the leader lease (tick thread) --------------------------

    def _onTick(self, timeToWait=0.0):
        if self._SyncObj__transport.ready and not self._SyncObj__needLoadDumpFile:
            self._election_tick()
        leading = self._SyncObj__raftState == _RAFT_STATE.LEADER
        term = self._SyncObj__raftCurrentTerm
        SyncObj._onTick(self, timeToWait)
        if leading and self._SyncObj__raftState != _RAFT_STATE.LEADER:
            if self._SyncObj__raftCurrentTerm > term:
                log.info("stopped leading: a peer is at raft term %d (ours was %d)",
                         self._SyncObj__raftCurrentTerm, term)
            else:  # CheckQuorum, or the adapter's step-down when its journal cannot write
                log.warning("stopped leading at raft term %d: no quorum of voters answered "
                            "within the leader fallback timeout, or the journal cannot be "
                            "written", term)

    def _SyncObj__connectedToAnyone(self):
        # pysyncobj asks this only to decide whether to start its own election (which raises
        # the term at once): never. `_election_tick` runs elections.
        return False

    def _election_tick(self) -> None:
        """Runs before pysyncobj's tick: when the election timeout has passed, starts a
        pre-vote round, or the election a won round (or a leadership transfer) calls for."""
        if self._SyncObj__selfNode is None or self._SyncObj__raftState == _RAFT_STATE.LEADER:
            return
        now = monotonic_time()
        if (self._SyncObj__raftElectionDeadline >= now
                or not SyncObj._SyncObj__connectedToAnyone(self)):
            return
        self._SyncObj__raftElectionDeadline = now + self._SyncObj__generateRaftTimeout()
        transfer = self._SyncObj__transferInProgress
        if transfer or self._pre_vote_won or not self._SyncObj__otherNodes:
            self._pre_vote_won = False
            self._campaign(transfer)
            return
        if self._SyncObj__raftLeader is not None:
            # Not heard from within the election timeout: no longer a known leader.
            self._SyncObj__raftLeader = None
            self._SyncObj__onLeaderChanged()
        self._pre_vote_term = self._SyncObj__raftCurrentTerm + 1
        log.info("no leader heard from within the election timeout: asking for pre-votes "
                 "for raft term %d", self._pre_vote_term)
        self._pre_votes = set()
        message = {
            'type': 'pre_vote',
            'term': self._pre_vote_term,
            'last_log_index': self._SyncObj__getCurrentLogIndex(),
            'last_log_term': self._SyncObj__getCurrentLogTerm(),
        }
        for node in self._SyncObj__otherNodes:
            self._SyncObj__transport.send(node, message)

    def _campaign(self, transfer: bool) -> None:
        """pysyncobj's election (raise the term, vote for itself, ask for votes), with the
        `transfer` mark when a leadership transfer asked for it."""
        self._pre_vote_term = None
        self._SyncObj__transferInProgress = False
        self._SyncObj__raftLeader = None
        self._SyncObj__setState(_RAFT_STATE.CANDIDATE)
        self._SyncObj__setCurrentTerm(self._SyncObj__raftCurrentTerm + 1,
                                      self._SyncObj__selfNode.id)
        log.info("campaigning for raft term %d%s", self._SyncObj__raftCurrentTerm,
                 " (leadership transfer)" if transfer else "")
        self._SyncObj__votesCount = 1
        message = {
            'type': 'request_vote',
            'term': self._SyncObj__raftCurrentTerm,
            'last_log_index': self._SyncObj__getCurrentLogIndex(),
            'last_log_term': self._SyncObj__getCurrentLogTerm(),
        }
        if transfer:
            message['transfer'] = True
        for node in self._SyncObj__otherNodes:
            self._SyncObj__transport.send(node, message)
        self._SyncObj__onLeaderChanged()
        if self._SyncObj__votesCount > (len(self._SyncObj__otherNodes) + 1) / 2:
            self._SyncObj__onBecomeLeader()

    def _in_lease(self) -> bool:
        """Whether this voter knows a live leader: it leads (and steps down when a quorum
        goes quiet), or it heard from its leader within the minimum election timeout."""
        if self._SyncObj__raftState == _RAFT_STATE.LEADER:
            return True
        return (self._SyncObj__raftLeader is not None
                and monotonic_time() - self._leader_contact < self._SyncObj__conf.raftMinTimeout)

    def _log_up_to_date(self, message) -> bool:
        last_term = self._SyncObj__getCurrentLogTerm()
        return (message['last_log_term'] > last_term
                or (message['last_log_term'] == last_term
                    and message['last_log_index'] >= self._SyncObj__getCurrentLogIndex()))

    def _receive_pre_vote(self, node, message) -> None:
        """Would this voter vote for `node` in `message['term']`? Changes nothing here."""
        if self._SyncObj__selfNode is None:
            return  # learners do not vote
        current = self._SyncObj__raftCurrentTerm
        granted = (message['term'] > current and not self._in_lease()
                   and self._log_up_to_date(message))
        self._SyncObj__transport.send(node, {
            'type': 'pre_vote_response', 'term': message['term'], 'granted': granted,
            'current_term': current})

    def _receive_pre_vote_response(self, node, message) -> None:
        if (self._pre_vote_term is None or message['term'] != self._pre_vote_term
                or self._pre_vote_term != self._SyncObj__raftCurrentTerm + 1
                or node not in self._SyncObj__otherNodes):
            return  # not for the round in progress
        if not message['granted']:
            theirs = message.get('current_term', 0)
            if theirs > self._SyncObj__raftCurrentTerm:
                # Our term is behind: catch up (a node stuck at an old term could never
                # win a pre-vote), without a vote, and try again at the next timeout.
                log.info("a voter is at raft term %d, above ours (%d): catching up",
                         theirs, self._SyncObj__raftCurrentTerm)
                self._pre_vote_term = None
                self._SyncObj__setCurrentTerm(theirs, None)
                self._SyncObj__setState(_RAFT_STATE.FOLLOWER)
            return
        self._pre_votes.add(node)
        if len(self._pre_votes) + 1 > (len(self._SyncObj__otherNodes) + 1) / 2:
            self._pre_vote_term = None
            self._pre_vote_won = True
            self._SyncObj__raftElectionDeadline = 0  # campaign on the next tick

    def _receive_stale_term(self, message) -> None:
        """A voter at a higher term ignored our AppendEntries: step down to its term."""
        term = message['term']
        if term > self._SyncObj__raftCurrentTerm:
            log.info("a peer is at raft term %d, above ours (%d): following it",
                     term, self._SyncObj__raftCurrentTerm)
            self._SyncObj__setCurrentTerm(term, None)
            self._SyncObj__setState(_RAFT_STATE.FOLLOWER)
            self._SyncObj__raftLeader = None


def _address(node) -> str:
    return getattr(node, "address", None) or str(node)
