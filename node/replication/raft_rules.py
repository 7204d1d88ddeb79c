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
- A leader sends every follower an AppendEntries right after each apply, only to carry the new
  commit index (with `appendEntriesUseBatch=False`): a lone write costs the leader a second
  message to pickle, seal and send per follower, and each follower one to open. Here the
  leader sends no message only for that: the next AppendEntries carries it, that of the next
  proposal or, when none comes, one sent `COMMIT_NOTICE_DELAY` after the apply (the tick's
  poll is cut short for it). Only entries whose callers wait on the leader are deferred so:
  when an entry a follower forwarded commits (its caller is answered once that follower
  applies it), or a new leader's no-op, the commit index goes out at once. Before a
  `read_index_response` to a follower or learner, and before a leadership transfer's
  `timeout_now`, a leader that still owes its commit index sends it, so a follower's read
  and a new leader do not wait for the delay.
- A follower answers every AppendEntries, also an empty one that only carries the commit
  index. Here a follower leaves an empty AppendEntries unanswered when its answer would
  repeat, to the same leader in the same term, the success it sent less than
  `appendEntriesPeriod` ago (same next index): such a reply tells the leader nothing but
  that the follower is alive, which the next heartbeat's answer tells within two periods,
  far inside `leaderFallbackTimeout`.
  Rejections, entries and the first answer to a new leader or term are always answered.
- A node that ignores AppendEntries of a lower term never tells that leader; a node whose
  term rose (it lost an election) would be cut off until the leader fails. Here it answers
  `stale_term` with its term, and the leader steps down (etcd-io/raft answers such messages).
- pysyncobj has no linearizable read but a no-op through the log (appended, fsynced and
  applied on every node). Here reads are confirmed by ReadIndex (Ongaro's thesis §6.4,
  etcd-io/raft `ReadOnlySafe`; the bookkeeping is `read_index.py`): a leader that has
  committed an entry of its term takes its commit index as the read index and sends a
  `read_index_ping` round (term, sequence number); a voter echoes it in a `read_index_pong`
  only while it follows that leader in that term (a lower-term ping gets `stale_term`); a
  quorum of the current voters, the leader counted, confirms the round. A follower or learner
  sends `read_index_request` to its leader and gets a `read_index_response` (the index, or
  `error`: `fallback` or `retry`) after the leader's round. Every read waiting when a round
  or request starts shares it; the others share the next. Rounds are not tried (the reads
  fall back to a barrier entry) before an entry of the term commits, while a membership
  change is uncommitted, for a while after a leadership transfer, and for
  `READ_INDEX_FALLBACK_PERIOD` after a round or request went unanswered.

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
up. `read_index_ping`, `read_index_pong`, `read_index_request` and `read_index_response` are
new types too: a leader whose quorum does not answer pings ends the round after the minimum
election timeout, and a follower whose leader does not answer gives up after twice that; the
reads then use barrier entries (which every version applies) for `READ_INDEX_FALLBACK_PERIOD`
before ReadIndex is tried again, so reads never hang on an older peer. Upgrade one node at a
time, as always.

Only `sealkv.node.replication.adapter` imports this module (it is part of the pysyncobj boundary).
"""
from __future__ import annotations

import collections
import logging
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from pysyncobj import SyncObj
from pysyncobj.monotonic import monotonic as monotonic_time
from pysyncobj.syncobj import _RAFT_STATE

from sealkv.node import errors
from sealkv.node.errors import where
from sealkv.node.replication.read_index import (
    FollowerRequests, LeaderRounds, OnReadIndex, ReadIndexFallback,
)

log = logging.getLogger(__name__)

# ReadIndex: after a round (or a follower's request) went unanswered, reads use barrier
# entries for this long before trying again (peers of an older sealkv never answer).
READ_INDEX_FALLBACK_PERIOD = 5.0
# An idle leader tells its followers a new commit index this long after applying it (a busy
# one sooner, in the next proposal's AppendEntries). Short, so that idle followers apply
# soon after the leader; long enough that the next write of a sequential client (about a
# millisecond later) carries it.
COMMIT_NOTICE_DELAY = 0.005
# A proposal callback with this attribute set has its entry's commit index sent at once.
TELL_FOLLOWERS = "tell_followers"
# The ReadIndex message types and the RaftRulesSyncObj method that receives each.
_READ_INDEX_HANDLERS = {
    'read_index_ping': '_receive_read_ping',
    'read_index_pong': '_receive_read_pong',
    'read_index_request': '_receive_read_request',
    'read_index_response': '_receive_read_response',
}

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
        # Leader: the commit index the last AppendEntries round carried (see
        # `_owe_commit_notice`); the tick's poller (set in SyncObj.__init__, see `_poller`).
        self._commit_sent = 0
        self._wake_by_poller: Optional[WakeByPoller] = None
        # ReadIndex (see read_index.py): reads handed over by other threads, the leader's
        # rounds, this node's requests to its leader, until when reads use barrier entries
        # instead, the log index of the last membership change, the last transfer's start.
        # The timeouts are set from the configuration once the base class has read it.
        self._read_inbox: collections.deque = collections.deque()
        self._rounds = LeaderRounds(1.0)
        self._requests = FollowerRequests(2.0)
        self._read_fallback_until = 0.0
        self.read_rounds = 0  # rounds confirmed as the leader (Status counts them)
        self._membership_change_index = 0
        self._transfer_started = float("-inf")
        # Whether the start-up adopted the membership entries of the log (see
        # `_adopt_log_configuration`); from then on applying one changes nothing.
        self._log_configuration_adopted = False
        super().__init__(*args, **kwargs)
        conf = self._SyncObj__conf
        self._rounds.timeout = conf.raftMinTimeout
        self._requests.timeout = 2 * conf.raftMinTimeout

    def _on_safety_violation(self, reason: str) -> None:
        raise NotImplementedError

    # pysyncobj builds its poller in SyncObj.__init__ (`self._poller = createPoller(...)`)
    # before anything subscribes to it; the assignment lands here and the tick polls through
    # a `WakeByPoller` around it, which the leader uses to send a commit notice on time.

    @property
    def _poller(self) -> Optional["WakeByPoller"]:
        return self._wake_by_poller

    @_poller.setter
    def _poller(self, poller) -> None:
        self._wake_by_poller = poller if isinstance(poller, WakeByPoller) \
            else WakeByPoller(poller)

    # -- leader: the commit index travels with the next AppendEntries (tick thread) -------

    def _SyncObj__applyLogEntries(self):
        # pysyncobj asks for an AppendEntries round at once after applying entries
        # (appendEntriesUseBatch=False), only to carry the new commit index: a leader defers
        # it instead, unless an entry's caller waits on another node. A follower's answer is
        # pysyncobj's to ignore (only a leader sends).
        leading = self._SyncObj__raftState == _RAFT_STATE.LEADER
        elsewhere = leading and self._proposed_elsewhere()
        send_now = SyncObj._SyncObj__applyLogEntries(self)
        if send_now and leading and not elsewhere:
            self._owe_commit_notice()
            return False
        return send_now

    def _proposed_elsewhere(self) -> bool:
        """Whether an entry about to be applied has no caller waiting on this leader (tick
        thread): a follower or learner forwarded it (its caller is answered once that node
        applies it, so the commit index goes out at once, as pysyncobj sends it), or it is
        an older term's entry or the leader's no-op, which every node should apply soon; or
        its caller asked for every node to hear of it at once (a callback marked
        `TELL_FOLLOWERS`: an operator's act, such as a KEK rewrap, that the operator may
        follow up on every member right after it is answered)."""
        waiting = self._SyncObj__commandsWaitingCommit
        for index in range(self._SyncObj__raftLastApplied + 1,
                           self._SyncObj__raftCommitIndex + 1):
            callers = waiting.get(index)
            if not callers or any(getattr(callback, TELL_FOLLOWERS, False)
                                  for _, callback in callers):
                return True
        return False

    def _owe_commit_notice(self) -> None:
        """Has the next AppendEntries round start no later than `COMMIT_NOTICE_DELAY` from now,
        when the followers have not been sent the commit index yet (tick thread).

        A proposal taken meanwhile sends its AppendEntries at once, carrying the commit index;
        otherwise pysyncobj's tick sends the round when `__newAppendEntriesTime` passes (its
        heartbeat clock, brought forward here), and the poller wakes the tick for it.
        """
        if self._SyncObj__raftCommitIndex <= self._commit_sent:
            return
        due = monotonic_time() + COMMIT_NOTICE_DELAY
        if due < self._SyncObj__newAppendEntriesTime:
            self._SyncObj__newAppendEntriesTime = due
        self._poller.wake_by = self._SyncObj__newAppendEntriesTime

    def _send_owed_commit_index(self, index: int) -> None:
        """Sends the AppendEntries round now when the last one carried a commit index below
        `index` (a leader, on the tick thread, before a message that assumes the followers
        learn `index` first: the connection to each peer keeps the order)."""
        if (self._SyncObj__raftState == _RAFT_STATE.LEADER and index > self._commit_sent):
            # The rules' sender itself, not an override that may hold the round back until
            # its group is synced: the message that follows must not overtake it.
            RaftRulesSyncObj._SyncObj__sendAppendEntries(self)

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
        elif kind in _READ_INDEX_HANDLERS:
            getattr(self, _READ_INDEX_HANDLERS[kind])(node, message)
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
        self._commit_sent = self._SyncObj__raftCommitIndex
        self._poller.wake_by = None
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
        if self._SyncObj__transport.ready and self._SyncObj__needLoadDumpFile:
            # pysyncobj's start-up step (load the dump), taken here so that the log's
            # configuration is in effect before the first message is handled.
            dump = self._SyncObj__conf.fullDumpFile
            if dump is not None and os.path.isfile(dump):
                self._SyncObj__loadDumpFile(clearJournal=False)
            self._SyncObj__needLoadDumpFile = False
            self._adopt_log_configuration()
        if self._SyncObj__transport.ready and not self._SyncObj__needLoadDumpFile:
            self._election_tick()
            self._read_tick()
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


    # -- ReadIndex: linearizable read points without a log entry (thesis §6.4) -----------

    def read_index(self, on_done: OnReadIndex) -> None:
        """Asks for a linearizable read index; any thread (never blocks).

        `on_done(index, error)` is called exactly once, on the tick thread, and must be
        short. `index` covers every write acknowledged before this call: a leader confirmed
        by a quorum of voters, in its term, after this call, that it still led when its
        commit index was `index`. The caller waits until its applied index reaches it. The
        errors: `ReadIndexFallback` (confirm with a barrier entry instead), `errors.Aborted`
        (the leader changed or stepped down: a read changes nothing, retry),
        `errors.Unavailable` (no leader known).
        """
        self._read_inbox.append(on_done)
        notifier = getattr(self, '_SyncObj__pipeNotifier', None)
        if notifier is not None:
            try:
                notifier.notify()  # wake the tick thread from its poll
            except OSError:  # the pipe is full of wake-ups: the tick thread is due anyway
                pass

    def transferLeadership(self, node=None, callback=None):
        # Conservative: rounds started while a transfer may be under way are not tried (a
        # round is safe anyway, its answers count only in its term, but not worth the doubt).
        self._transfer_started = monotonic_time()
        # The target then campaigns knowing the commit index of every entry it holds.
        self._send_owed_commit_index(self._SyncObj__raftCommitIndex)
        SyncObj.transferLeadership(self, node, callback)

    # -- membership (tick thread) ------------------------------------------------------

    def _adopt_log_configuration(self) -> None:
        """Puts the membership entries of the log after the dump in effect, at start-up.

        A server uses the latest configuration in its log, committed or not (Raft thesis
        §4.1). pysyncobj does so as entries are appended or received, but after a restart it
        starts from the dump's members and applies a membership entry only once the commit
        index passes it; the saved commit index may be up to a second old (the meta file is
        written once a second) and a follower's may be older still. A member added in that
        gap can then lead the cluster while the restarted node refuses its connections as
        unknown: the node never hears a leader, and the cluster never reaches it.
        """
        for entry in self._SyncObj__getEntries(self._SyncObj__raftLastApplied + 1):
            request = self._SyncObj__parseChangeClusterRequest(entry[0])
            if request is not None:
                self._SyncObj__doChangeCluster(request)
        self._log_configuration_adopted = True

    def _SyncObj__doApplyCommand(self, command):
        # pysyncobj applies a membership entry again when it commits ("required only after
        # node restarts"): the start-up adoption did that already, and every later entry
        # took effect when appended or received. Applying it again would undo a later change
        # of the log still uncommitted (add x, then remove x: the commit of the add re-adds x).
        if (self._log_configuration_adopted
                and self._SyncObj__parseChangeClusterRequest(command) is not None):
            return None
        return SyncObj._SyncObj__doApplyCommand(self, command)

    def _SyncObj__doChangeCluster(self, request, reverse=False):
        # Called as the change is appended (leader) or received (follower): no round starts
        # until the commit index passes it (the quorum may be changing under the round).
        self._membership_change_index = max(self._membership_change_index,
                                            self._SyncObj__getCurrentLogIndex() + 1)
        return SyncObj._SyncObj__doChangeCluster(self, request, reverse)

    def _read_tick(self) -> None:
        """Hands the reads of other threads to the leader's rounds or to this node's requests
        to its leader, and ends rounds and requests that can no longer be answered."""
        inbox = self._read_inbox
        leading = self._SyncObj__raftState == _RAFT_STATE.LEADER
        leader = self._SyncObj__raftLeader
        while inbox:
            on_done = inbox.popleft()
            if leading:
                self._rounds.add(on_done)
            elif leader is not None:
                self._requests.add(on_done)
            else:
                _tell(on_done, None, errors.Unavailable(
                    "no leader: the cluster has no quorum or is electing"))
        now = monotonic_time()
        if not self._rounds.idle:
            self._leader_read_tick(now, leading)
        if not self._requests.idle:
            self._follower_read_tick(now, leading, leader)

    def _leader_read_tick(self, now: float, leading: bool) -> None:
        rounds = self._rounds
        current = rounds.current
        if not leading or (current is not None
                           and current.term != self._SyncObj__raftCurrentTerm):
            self._answer_reads(rounds.drain(), None, errors.Aborted(
                "read not confirmed: this node stopped leading; a read changes nothing, retry"))
            return
        expired = rounds.expired(now)
        if expired is not None:
            self._unanswered(now, expired.waiters, (
                f"a read-index round had no answer from a quorum of voters within "
                f"{rounds.timeout:.1f}s ({len(expired.acks)} of {len(expired.voters)} "
                f"answered; peers of an older sealkv do not answer)"))
        self._start_round(now)

    def _unanswered(self, now: float, waiters, why: str) -> None:
        """A round or a request went unanswered: its reads, and those of the next
        `READ_INDEX_FALLBACK_PERIOD` seconds, use barrier entries."""
        self._read_fallback_until = now + READ_INDEX_FALLBACK_PERIOD
        log.warning("%s: linearizable reads use barrier entries for %.0fs", why,
                    READ_INDEX_FALLBACK_PERIOD)
        self._answer_reads(waiters, None, ReadIndexFallback(why))

    def _read_round_refusal(self, now: float) -> Optional[str]:
        """Why the leader cannot start a round now (reads then use a barrier entry), or None."""
        commit = self._SyncObj__raftCommitIndex
        noop = self._SyncObj__noopIDx
        if noop is None or commit < noop:
            return "no entry of this leader's term is committed yet"
        if commit < self._membership_change_index:
            return "a membership change is not committed yet"
        if now - self._transfer_started < self._SyncObj__conf.raftMaxTimeout:
            return "a leadership transfer may be under way"
        if now < self._read_fallback_until:
            return "a recent read-index round went unanswered"
        return None

    def _start_round(self, now: float) -> None:
        """Starts the next round for the pending reads, when none is in flight (tick thread)."""
        rounds = self._rounds
        if rounds.current is not None or not rounds.pending:
            return
        refusal = self._read_round_refusal(now)
        if refusal is not None:
            self._answer_reads(rounds.drain(), None, ReadIndexFallback(refusal))
            return
        term = self._SyncObj__raftCurrentTerm
        started = rounds.start(now, self._SyncObj__raftCommitIndex, term,
                               self._SyncObj__otherNodes)
        if started.confirmed:
            self.read_rounds += 1
            self._answer_reads(started.waiters, started.index, None)
            return
        ping = {'type': 'read_index_ping', 'term': term, 'seq': started.seq}
        for node in started.voters:
            self._SyncObj__transport.send(node, ping)

    def _answer_reads(self, waiters, index: Optional[int], error) -> None:
        """Answers local reads (callables) and followers' requests ((node, request id)).

        A follower waits until it has applied the index: it is sent the commit index first
        if the leader still owes it (`_owe_commit_notice`), so its read does not wait for
        the delayed round."""
        if error is None and any(isinstance(waiter, tuple) for waiter in waiters):
            self._send_owed_commit_index(index)
        for waiter in waiters:
            if not isinstance(waiter, tuple):
                _tell(waiter, index, error)
                continue
            node, request_id = waiter
            message = {'type': 'read_index_response', 'request_id': request_id}
            if error is None:
                message['index'] = index
            else:
                message['error'] = 'fallback' if isinstance(error, ReadIndexFallback) \
                    else 'retry'
            self._SyncObj__transport.send(node, message)

    def _follower_read_tick(self, now: float, leading: bool, leader) -> None:
        requests = self._requests
        gone = requests.leader_gone(None if leading else leader)
        if gone is not None:
            self._answer_reads(gone.waiters, None, errors.Aborted(
                "read not confirmed: the leader changed; a read changes nothing, retry"))
        if leading:  # this node now leads: its own rounds serve the reads
            for waiter in requests.drain():
                self._rounds.add(waiter)
            self._start_round(now)
            return
        expired = requests.expired(now)
        if expired is not None:
            self._unanswered(now, expired.waiters, (
                f"the leader did not answer a read-index request within "
                f"{requests.timeout:.1f}s (a leader of an older sealkv does not)"))
        self._send_read_request(now, leader)

    def _send_read_request(self, now: float, leader) -> None:
        requests = self._requests
        if requests.current is not None or not requests.pending:
            return
        if leader is None:
            self._answer_reads(requests.drain(), None, errors.Unavailable(
                "no leader: the cluster has no quorum or is electing"))
            return
        if now < self._read_fallback_until:
            self._answer_reads(requests.drain(), None, ReadIndexFallback(
                "a recent read-index request went unanswered"))
            return
        term = self._SyncObj__raftCurrentTerm
        started = requests.start(now, leader, term)
        if not self._SyncObj__transport.send(leader, {
                'type': 'read_index_request', 'request_id': started.seq, 'term': term}):
            requests.answer(started.seq)
            self._answer_reads(started.waiters, None, errors.Unavailable(
                "not connected to the leader; a read changes nothing, retry"))

    def _receive_read_ping(self, node, message) -> None:
        """A voter echoes a round of the leader it follows, in its own term only."""
        if self._SyncObj__selfNode is None:
            return  # learners never count in a quorum
        term = message['term']
        current = self._SyncObj__raftCurrentTerm
        if term < current:
            self._SyncObj__transport.send(node, {'type': 'stale_term', 'term': current})
        elif (term == current and self._SyncObj__raftLeader == node
              and self._SyncObj__raftState != _RAFT_STATE.LEADER):
            self._SyncObj__transport.send(node, {
                'type': 'read_index_pong', 'term': term, 'seq': message['seq']})

    def _receive_read_pong(self, node, message) -> None:
        if message['term'] > self._SyncObj__raftCurrentTerm:
            self._receive_stale_term(message)
            return
        if self._SyncObj__raftState != _RAFT_STATE.LEADER:
            return
        done = self._rounds.ack(node, message['seq'], message['term'])
        if done is not None:
            self.read_rounds += 1
            self._answer_reads(done.waiters, done.index, None)
            self._start_round(monotonic_time())

    def _receive_read_request(self, node, message) -> None:
        """The leader takes a follower's (or learner's) request into its next round."""
        waiter = (node, message['request_id'])
        if self._SyncObj__raftState != _RAFT_STATE.LEADER:
            self._answer_reads([waiter], None, errors.Aborted("not the leader"))
            return
        self._rounds.add(waiter)
        self._start_round(monotonic_time())

    def _receive_read_response(self, node, message) -> None:
        current = self._requests.current
        if current is None or current.target != node:
            return  # not from the node asked: ignored (the request times out)
        done = self._requests.answer(message['request_id'])
        if done is None:
            return  # a request already given up
        if 'index' in message:
            self._answer_reads(done.waiters, message['index'], None)
        elif message.get('error') == 'fallback':
            self._answer_reads(done.waiters, None, ReadIndexFallback(
                "the leader cannot confirm a read index now"))
        else:
            self._answer_reads(done.waiters, None, errors.Aborted(
                "read not confirmed: the leader stepped down; a read changes nothing, retry"))
        if self._SyncObj__raftState != _RAFT_STATE.LEADER:
            self._send_read_request(monotonic_time(), self._SyncObj__raftLeader)


class WakeByPoller:
    """pysyncobj's poller, whose wait also ends at `wake_by` (a monotonic time, or None).

    The tick thread ends each tick with `poll(autoTickPeriod)`; a leader that owes its
    followers a commit index sets `wake_by` so that the tick that sends it runs on time.
    A deadline that passed ends one wait at once and is then forgotten, so a node that no
    longer leads never spins. Everything else is forwarded to `inner`.
    """

    def __init__(self, inner):
        self.inner = inner
        self.wake_by: Optional[float] = None

    def subscribe(self, descr, callback, eventMask) -> None:
        self.inner.subscribe(descr, callback, eventMask)

    def unsubscribe(self, descr) -> None:
        self.inner.unsubscribe(descr)

    def poll(self, timeout: float) -> None:
        wake_by = self.wake_by
        if wake_by is not None:
            left = wake_by - monotonic_time()
            if left <= 0:
                self.wake_by = None
            timeout = max(0.0, min(timeout, left))
        self.inner.poll(timeout)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _address(node) -> str:
    return getattr(node, "address", None) or str(node)


def _tell(on_done: OnReadIndex, index: Optional[int], error) -> None:
    try:
        on_done(index, error)
    except Exception as exc:  # never raise into pysyncobj's tick thread
        log.error("read-index callback failed: %s at %s", type(exc).__name__, where(exc))
