// Package concurrency builds distributed locks and leader election on
// kvd leases, as etcd's clientv3/concurrency does.
//
// A Session is a lease kept alive in the background; its Done channel
// closes when the lease is lost (revoked, or expired because renewals did
// not reach the cluster), and everything held through the session is lost
// with it: the keys of its locks and campaigns are attached to the lease.
//
// Mutex and Election keep their keys under a hash tag ("{name}/..."), so
// that all of one lock's or election's keys live in one shard: their
// create revisions, which order the waiters, are that shard's and compare.
// A holder's create revision is its fencing token: a write that must
// happen only while the lock is held compares it in the same transaction
// (Mutex.IsOwner), and fails once another holder has taken over.
package concurrency
