// Package flood runs hostile clients against a 3-node cluster of kvd
// processes at their default settings and checks that every node's memory
// stays within its documented budget while a well-behaved client keeps
// being served (docs/memory.md, "Floods").
//
// Each flood runs for a bounded time while a victim client (the kvd client
// library) does linearizable gets the whole time: 24 Batch streams of
// 1 MiB puts; Batch clients that send gets of a 1 MiB value and never read
// their answers; transactions of 128 gets of a 1 MiB value, with and
// without a session; Ranges and scans over many 1 MiB values. A sampler
// reads each node's RssAnon and VmRSS from /proc every 50 ms, and VmHWM
// (reset when the flood begins) when it ends.
//
// The budget asserted: every node alive after every flood, every node's
// peak anonymous resident memory (RssAnon) below 640 MiB, and at least 99%
// of the victim's gets answered. VmRSS, which adds the resident pages of
// the bbolt file, is reported. The tests build only with the tag flood:
// `make flood` runs TestFlood (30 s per flood), `make flood-short`
// TestFloodShort (5 s per flood, about two minutes in all).
package flood
