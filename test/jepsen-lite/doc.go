// Package jepsenlite tests kvd the way Jepsen does, on one machine: it
// starts a real 3-node cluster of kvd processes built from the tree, runs
// concurrent clients through the Go client library, injects faults (kill
// -9, kill of every node, SIGSTOP pauses, network partitions, slow links)
// chosen by a seeded nemesis, records a history, and checks it:
// linearizability of per-key registers (get, put, cas) with porcupine,
// durability of every acknowledged write across a final kill -9 and
// restart of every node, exactly-once increments of counters, and that
// watchers (on keys and on a prefix of every shard) received every
// applied change once, in order, and nothing else; and that writes fenced
// by a client/concurrency Mutex never come from a holder that lost the
// lock, and an abandoned lock passes on within its lease's TTL.
//
// Partitions cut real traffic through TCP proxies the harness owns, one in
// front of every node's client port and one in front of every node's peer
// port; the nodes advertise the proxies, so all traffic crosses them. A
// proxy tells which node dialed a peer connection from /proc (see
// connOwner), which gives per-pair cuts (split, bridge) without any change
// to kvd and without root. README.md says what is tested, why proxies and
// not network namespaces, and how to replay a seed.
package jepsenlite
