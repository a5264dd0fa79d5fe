// Package client is the Go client of kvd, a Raft-replicated, sharded
// key-value store. kvctl is built on it.
//
// # Usage
//
//	c, err := client.New(ctx, client.Config{Endpoints: []string{"127.0.0.1:2379"}})
//	if err != nil { ... }
//	defer c.Close()
//
//	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
//	defer cancel()
//	if _, err := c.Put(ctx, []byte("greeting"), []byte("hello")); err != nil { ... }
//	kv, err := c.Get(ctx, []byte("greeting"))
//	switch {
//	case errors.Is(err, client.ErrNotFound):    // no such key
//	case errors.Is(err, client.ErrUnavailable): // no quorum, no leader, every node down: try later
//	}
//
// Compare-and-swap is a Txn on one key: compare, then put on success and
// read on failure to learn what the key holds instead.
//
//	resp, err := c.Txn(ctx, &kvpb.TxnRequest{
//		Compare: []*kvpb.Compare{{Key: k, Target: kvpb.Compare_VALUE, Result: kvpb.Compare_EQUAL, Value: old}},
//		Success: []*kvpb.RequestOp{{Op: &kvpb.RequestOp_Put{Put: &kvpb.PutRequest{Key: k, Value: next}}}},
//		Failure: []*kvpb.RequestOp{{Op: &kvpb.RequestOp_Get{Get: &kvpb.GetRequest{Key: k}}}},
//	})
//	// err == nil && !resp.Succeeded: the compare failed;
//	// resp.Responses[0].GetGet().GetKv() is the current key (nil: missing).
//
// On a missing key a VALUE compare is false; VERSION, MOD and CREATE
// compare against 0; EXISTS compares existence.
//
// # How requests are routed
//
// New fetches the cluster map from the first endpoint that answers and then
// talks to the members it lists, one gRPC connection each. A key is hashed
// onto the ring (built from the map exactly as the servers build it) to
// find its shard, and the request goes to that shard's cached leader. A
// "not leader" answer carries a hint that updates the cache; without a hint
// the next replica is tried. A "stale epoch" answer refreshes the map.
// Transient failures are retried with exponential backoff and full jitter
// (20 ms base, 250 ms cap); every attempt is bounded by Config.AttemptTimeout
// so a hung node cannot consume the whole deadline.
//
// A background loop health-checks every member each HeartbeatInterval.
// Three consecutive failures (heartbeats or requests) open a node's circuit
// breaker: requests skip it until a later heartbeat succeeds. A per-node
// bulkhead (MaxInFlightPerNode) bounds the requests in flight to one node;
// a full node is treated as busy, never queued on.
//
// Put, Get, Delete and Txn travel to a node on one long-lived KV.Batch
// stream: requests queued while the previous message was written leave
// together in the next, and even one request per message costs less than
// a unary call (no per-call stream set-up, headers or trailers). Each
// request still has its own deadline, answer and retries.
//
// # Namespaces
//
// WithNamespace(c, "app1/") is a view of c in which every key, range,
// transaction and watch carries the prefix, stripped from what comes
// back: applications sharing a cluster under their own prefixes do not
// see each other's keys. A scan page's Resume token resumes a watch just
// after the state the scan read, so a prefix can be loaded and then
// followed without a gap or a repeat (docs/config-store.md).
//
// # Caveats
//
//   - Always pass a context with a deadline. The client retries retryable
//     failures until the context ends; with context.Background it retries
//     for as long as the cluster is unavailable.
//   - Writes are exactly-once per Client: each carries the client's random
//     session id and a sequence number that stays the same across retries,
//     and the server answers a retry with the recorded result. Two Clients
//     (or a Client recreated after a crash) are two sessions: a write
//     retried by a new Client may apply twice.
//   - ErrUnavailable is not a promise that a write did not happen: a write
//     whose deadline ran out may still commit.
//   - Txn is atomic only within one shard and routes by its first key; give
//     related keys a hash tag ("{user42}/name", "{user42}/email") to place
//     them in one shard.
//   - Scan is scatter-gather: each shard's part is linearizable (unless
//     Serializable) and every page reads a shard at the revision its first
//     page saw, but a scan is not a snapshot across shards (revisions are
//     per shard). ScanPage.Resume is the watch resume token of what the
//     scan read: Watch(ctx, prefix, WithPrefix(), WithResume(page.Resume))
//     delivers exactly the changes after it. Continuation tokens are
//     opaque and tied to this client's token format version.
//   - Count, like Scan, asks every shard (one count-only Range each) and
//     sums the answers: each shard's count is linearizable, the sum is not
//     a snapshot across shards.
//   - Serializable reads (WithSerializable) may return stale data.
package client
