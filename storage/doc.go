// Package storage is kvd's durable state: raft.Storage for every raft
// group of a node, and the state machine those groups apply to. An Engine
// is one bbolt file, with its WAL and its writer, holding any number of
// shards; a Store is a node's Engines, its partitions (store.go): one by
// default, so that one bbolt commit and one WAL record cover every shard,
// or several, so that one shard's large writes delay only the shards of
// its own file.
//
// # Layout
//
// One Engine's file holds every shard of its partition, so that one fsync
// can make the writes of all of them durable at once:
//
//	node/                  node-level metadata (Engine.GetMeta/PutMeta)
//	shards/<id>/raft/      hard state, snapshot metadata, applied index+term,
//	                       conf state, incarnation
//	shards/<id>/log/       raft entries by big-endian index, contiguous
//	shards/<id>/kv/        the key-value data (Txn.Get/Put, Reader.Get)
//	shards/<id>/meta/      state-machine metadata: revision, sessions
//	shards/<id>/hist/      state-machine change history (Txn.PutHistory)
//	staging/<seq>/         snapshots being received
//	wal/gen                the WAL generation that follows this commit
//
// Every value in kv/, meta/ and hist/ (the state buckets) is stored behind a 64-bit checksum of its key
// and value (checksum.go); reads verify it, so a value changed on disk is
// reported as ErrCorrupt and never returned, and snapshots neither send nor
// accept a pair that fails it. Each shard also keeps a state hash, the sum
// of its state buckets' checksums, updated with the data: replicas compare it
// at the same applied index and a scrub compares it with the stored pairs.
// node/ records the layout version; Open refuses a file of another one.
//
// and kvd.wal beside it is the write-ahead log of the rounds since the last
// bbolt commit (below). The partitions of a Store share kvd.wal, a region
// each, and its fdatasyncs.
//
// # The writer: group commit and the WAL
//
// Exactly one goroutine, the writer, writes to bbolt. Shard.Save, Compact,
// CreateShard, PutMeta and the chunks of StageSnapshot are
// requests sent to it on a channel; the caller blocks until the answer. The
// writer takes one request, then every request already waiting, from all
// shards, and performs them in queue order as ONE round, then makes the
// round durable once, publishes the new in-memory state of each shard
// touched and answers every waiter. While it syncs, the next requests pile
// up and form the next round: N shards saving at once cost about one sync,
// and the sync rate follows the disk, not the number of shards.
//
// A round's requests run in a bbolt write transaction that stays open
// across rounds. A round of plain Saves is made durable by one record in
// the write-ahead log (kvd.wal next to the bbolt file: the rounds' new log
// entries and hard states) and one fdatasync of a preallocated file, where
// a bbolt commit writes every dirty B+tree page and syncs twice, several
// times as long (8c4144d). The transaction commits every
// Options.CommitInterval (200 ms), when a request needs it (snapshot
// install, compaction, membership change, log truncation below the
// cache, shard create/delete, node metadata, a Save without NoWait that
// applies), on Flush, on Close, and
// when the WAL nears its preallocated size; each commit restarts the WAL.
// Open replays the WAL records written since the last commit (wal.go
// explains how generations tell them apart) and commits them. A torn last
// record (never acknowledged) ends the replay, with a warning; a damaged
// record that had been synced, found because a later record says so,
// fails Open with ErrCorrupt rather than lose the acknowledged rounds
// after it.
//
// A request is validated before it writes anything, so a rejected request
// (an out-of-date snapshot, a log gap, compacting beyond applied) fails
// alone. If the transaction, the WAL write or the commit fails (a bbolt or
// disk error, a panicking ApplyFunc), the transaction is rolled back, every
// waiter of the round gets the error, and the engine refuses all later
// writes with ErrFailed: the in-memory view might no longer match the disk,
// and a node that cannot persist must stop loudly rather than acknowledge
// what it has not written. What was acknowledged is in the WAL.
//
// Applying committed entries happens inside the same transaction, which
// stores the applied index with the data. The applied index therefore
// never differs from the data it describes, and replay after a crash is
// idempotent: entries at or below the applied index are skipped. The WAL
// does not hold applied state, so a crash rolls the applied index back to
// the last commit and raft applies the rest again. Readers (Shard.Applied,
// View, snapshots) see the applied state of the last commit;
// Engine.AppliedC signals each commit that moves it, and Flush asks for
// one.
//
// # Locks
//
// Engine.mu guards the map of Shard objects (so OpenShard returns one
// *Shard per shard). Shard.mu guards the shard's published state: hard
// state, snapshot metadata, last index, the cached log tail, applied index
// and conf state. The writer replaces that state, never modifies it, after
// a round is durable, so raft's reads (Entries, Term, FirstIndex...) on
// the raft goroutine see only what is durable and never wait for an fsync.
// Entries not yet in committed bbolt stay in the cache, even beyond its
// limit, until a commit has put them there.
// Entries older than the cache are read from bbolt with Shard.mu held; the
// writer holds the same lock across a commit that rewrites such entries
// (compaction, snapshot install, truncation below the cache), so a reader
// never combines the old in-memory view with a newer disk. The two kinds of
// lock are never held together, and only the writer ever holds several
// Shard locks, so there is no lock order to get wrong.
//
// # Snapshots
//
// Sending: Shard.OpenSnapshot opens a bbolt read transaction, a consistent
// view of the shard's state buckets with the applied index and conf
// state of that same view; Next yields pairs in chunks of about 1 MiB. The
// view does not block writers, but pages freed while it is open cannot be
// reused, and a remap of the file waits for it (hence the large default
// InitialMmapSize).
//
// Receiving: Engine.StageSnapshot writes the streamed pairs into
// staging/<seq>/ in rounds of about 4 MiB through the writer, so a large
// snapshot never sits in memory, then marks the staging complete and returns
// a token for pb.Snapshot.Data. The Save that carries the snapshot swaps the
// staged buckets in place of the shard's (bbolt MoveBucket: no copy), drops
// the log and records the snapshot's metadata as snapshot, applied index and
// conf state, all in one transaction. Stagings that can no longer be
// installed are dropped at the next install of the shard and at Open.
package storage
