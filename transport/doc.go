// Package transport carries Raft messages between kvd nodes over gRPC: the
// messages of every shard a pair of nodes shares travel, batched, on one
// long-lived stream, and snapshots travel apart on a streaming RPC of their
// own.
//
// # One stream per pair
//
// Between two nodes there is exactly one Raft.Stream, used in both
// directions. The node with the lower id dials the higher one and opens the
// stream; its first Batch (empty, a hello) names it in From, and the
// acceptor answers with a hello of its own once it has adopted the stream,
// so the dialer knows both directions work and that the address really
// belongs to the peer it meant (a wrong address fails with ErrPeerMismatch
// instead of delivering messages to the wrong node). The higher-id node
// sends to the lower one on that inbound stream; until one is up, its
// messages to that peer are dropped and reported unreachable, which raft
// handles like any lost message.
//
// Why a fixed dialer: if both sides dialed, each pair would have two
// streams, or a tie-break racing two reconnects after every failure, and
// messages of one shard could take either path and arrive out of order. A
// deterministic rule needs no negotiation: one side reconnects (jittered
// exponential backoff, 50 ms to 2 s), the other waits, and a newer inbound
// stream from a peer always replaces the older one, which is dead or about
// to be. This keeps the "one gRPC stream per peer" of docs/design.md
// (Durability and availability).
//
// A newer inbound stream replaces the older one only if it comes from the
// same process; see Identity.
//
// # Identity
//
// Every Stream and Snapshot RPC opens with the dialer's identity in its
// request metadata: cluster id, node id, the node id it means to reach, a
// nonce drawn at each start, and its data dir's incarnation
// (Config.Incarnation), with the incarnation it recorded for the target.
// The acceptor answers with its own cluster id, node id, nonce and
// incarnation in the response header before any message flows. The
// acceptor refuses (FailedPrecondition) a stream of another cluster, one
// meant for another node id (the dialer's address for its peer is wrong),
// one from a node id that already has a live stream with another nonce (a
// second process started with that id; a restarted node waits until its
// old stream is noticed dead), and one whose incarnation differs from the
// one first recorded for that id (Config.Incarnations): that node lost its
// raft state, and letting it vote or take appends would break raft's
// guarantees. The dialer checks the header the same way and never uses a
// link that fails. Refusals are logged at ERROR on both sides, at most
// once per 30 s per cause. The node whose data dir is new learns it either
// from the refusal's trailer or from the incarnation the dialer expected,
// and Config.Evicted tells the embedder, which must stop serving: the node
// can only rejoin as a new member.
//
// # Versions
//
// The identity includes the range of peer protocol versions each side
// speaks (version.go): the dialer announces its range in the request
// metadata, the acceptor in its header, and each side refuses, as above,
// a peer whose range does not overlap its own (ErrProtocolVersion). The
// pair speaks the newest version both speak. A peer that announces none
// is a build from before versions and speaks version 1. The check runs
// once per stream; batches carry no version.
//
// Dead links are noticed in seconds, not at the next TCP timeout. Each side
// sends an empty batch after a second without traffic, and breaks the
// stream when nothing at all has arrived for four seconds; the dialer then
// reconnects. gRPC keepalive backs this up: the accepting side's server
// pings every second and drops the connection after 2 s without an answer
// (ServerOptions; pass them to the server you call Register on). gRPC does
// not let a client ping more often than every 10 s, which is why the
// application-level pings exist; gRPC also sets TCP_USER_TIMEOUT to the 2 s
// keepalive timeout, so bytes left unacknowledged on a dead link close the
// connection even sooner.
//
// # Batching
//
// Send never blocks: it puts each message on its destination peer's queue
// (Config.QueueSize; when full, the message is dropped and reported
// unreachable — backpressure, never unbounded memory). Each peer has one
// sender goroutine that waits for the queue, then drains whatever has
// accumulated, up to Config.MaxBatchMessages messages or MaxBatchBytes, into
// one Batch, whatever shards the messages belong to. Under light load a
// batch holds one message and adds no delay; under load the messages that
// piled up while the previous batch was on the wire leave together.
// Stats reports MessagesSent/BatchesSent as messages per batch.
//
// Leadership checks (raftnode's node-wide ReadIndex round: a question
// listing shards, and its answer) share the peer's queue and batches
// (SendLeaderCheck, Handler.HandleLeaderCheck) and count as messages. A
// check that cannot be queued is dropped without a report: its sender
// asks again.
//
// Messages of one shard to one peer leave in the order Send saw them, over
// one stream, and are delivered in that order, so raft sees no reordering
// except across a reconnect.
//
// # Snapshots
//
// A MsgSnap never goes on the stream: a multi-megabyte snapshot would stall
// every heartbeat behind it. Send hands it to one of two snapshot workers
// (so at most two snapshots are in flight), which opens the shard's state
// with SnapshotSource.OpenSnapshot, replaces the message's snapshot
// metadata with the reader's (the reader streams the state at its own,
// newer, applied index, and raft accepts a snapshot newer than it asked
// for), dials the peer's address on a connection of its own, whichever
// side owns the stream, and sends a header chunk, the data chunks and a
// last chunk on the Snapshot RPC. When the RPC ends it calls
// Handler.ReportSnapshot, once per MsgSnap, with failed set on any error.
// The receiving side calls Handler.HandleSnapshot with the header and a
// pull function that reads one chunk from the stream per call, so neither
// side ever holds a whole snapshot in memory.
//
// # Goroutines
//
// Every goroutine the package starts goes through one helper that adds it
// to a WaitGroup under the lock Stop takes, selects on the transport's (or
// its peer's) done channel, and is waited for by Stop:
//
//   - per peer: a sender goroutine (owns batching, writes the stream through
//     its link), and on the dialing side a dial goroutine (owns the client
//     connection and the stream: dials, receives, reconnects);
//   - per inbound stream: a receive goroutine; the gRPC handler goroutine
//     owns the stream and returns, ending it, when the stream fails, is
//     replaced, or the transport stops;
//   - two snapshot workers.
//
// Handler methods are called from receive goroutines, snapshot workers,
// gRPC handler goroutines, and the goroutine that calls Send; see Handler.
// Stop is idempotent: it cancels everything, closes every stream and waits.
// It does not stop the gRPC server.
package transport
