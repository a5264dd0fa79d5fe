package client

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"maps"
	"math"
	"slices"
	"strings"
	"sync"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kvd/kvd/internal/keys"
	"github.com/kvd/kvd/proto/kvpb"
)

// DefaultScanLimit is the page size of Scan when ScanOptions.Limit is 0.
const DefaultScanLimit = 1000

// ScanOptions tune Scan.
type ScanOptions struct {
	// Limit caps the keys in one page (default DefaultScanLimit).
	Limit int
	// KeysOnly leaves values out.
	KeysOnly bool
	// Serializable lets any replica answer each shard's part.
	Serializable bool
	// Latest reads every page from the shards' latest state instead of
	// the revision each shard's first page saw: later pages then cost no
	// replay of the history written since, and a long scan cannot outlive
	// the history it needs, but a key written between pages may or may
	// not appear, and the pages carry no Revisions nor Resume. For scans
	// that change what they scan, such as deleting a prefix page by page.
	Latest bool
	// Token continues a scan: pass the Next of the previous page, with the
	// same start and end. "" starts at start. The token carries the
	// revision each shard was first read at, so every page reads each
	// shard as of that same revision.
	Token string
}

// ScanPage is one page of a Scan.
type ScanPage struct {
	// KVs are in ascending key order, at most Limit of them.
	KVs []*kvpb.KeyValue
	// Next continues the scan (ScanOptions.Token); "" when the range is
	// exhausted.
	Next string
	// Revisions is, per data shard, the revision its part of the scan
	// was read at: the first page pins each shard's revision and every
	// later page reads the shard as of it.
	Revisions map[uint64]int64
	// Resume is a watch resume token (WithResume) of the state the scan
	// read: a prefix watch from it delivers exactly the changes made
	// after it, each once, none missed. It is the same on every page of
	// one scan.
	Resume string
}

// Scan returns the keys in [start, end) in key order, one page at a time.
// An empty end means "to the end of the key space"; a prefix scan of p is
// Scan(ctx, p, PrefixEnd(p), ...).
//
// Keys are spread over shards by hash, so Scan asks every shard for its
// part (in parallel, each from the shard's leader unless Serializable) and
// merges them. Each shard's part is linearizable and read at one revision
// of the shard, the one its first page saw, on every page (later pages read
// the shard's history as of that revision, docs/design.md, Reads at a
// revision): a key written between two pages does not appear, and the
// page's Resume token starts a watch exactly after what the scan read.
// The scan as a whole is not a snapshot across shards, since revisions are
// per shard. A scan that outlives its shards' history (--history-revisions)
// fails with a *CompactedError; ScanOptions.Latest reads every page from
// the latest state instead. Memory per page is bounded by about twice
// Limit, however large the range.
func (c *Client) Scan(ctx context.Context, start, end []byte, opts ScanOptions) (*ScanPage, error) {
	if c.isClosed() {
		return nil, ErrClosed
	}
	limit := opts.Limit
	if limit <= 0 {
		limit = DefaultScanLimit
	}
	var pinned map[uint64]int64
	if opts.Token != "" {
		tok, err := decodeToken(opts.Token)
		if err != nil {
			return nil, fmt.Errorf("scan: %w", err)
		}
		if bytes.Compare(tok.resume, start) < 0 {
			return nil, fmt.Errorf("scan: %w: token is before the start of the range", ErrInvalidToken)
		}
		start, pinned = tok.resume, tok.revs
	}

	var parts []*scanPart
	for _, shard := range c.dataShards() {
		p := &scanPart{shard: shard, next: start, more: true}
		if rev, ok := pinned[shard]; ok && !opts.Latest {
			p.rev, p.pinned = rev, true
			// A shard read at revision 0 had no keys then: the proto's
			// revision 0 would read it now instead.
			p.more = rev > 0
		}
		parts = append(parts, p)
	}
	if len(parts) == 0 {
		return &ScanPage{}, nil
	}
	if len(end) > 0 && bytes.Compare(start, end) >= 0 {
		if opts.Token == "" || opts.Latest {
			return &ScanPage{}, nil // no shard read: no revisions either
		}
		return pinnedPage(parts, nil), nil
	}

	// Ask each shard for a bit more than its fair share of the page, so a
	// balanced ring fills the page in one parallel round.
	batch := limit*5/4/len(parts) + 1
	batch = max(batch, min(limit, 16))
	batch = min(batch, limit)
	sc := &scanner{c: c, end: end, batch: batch, opts: opts}

	if err := sc.fetchAll(ctx, parts); err != nil {
		return nil, fmt.Errorf("scan: %w", err)
	}
	page := &ScanPage{KVs: make([]*kvpb.KeyValue, 0, min(limit, len(parts)*batch))}
	for len(page.KVs) < limit {
		var best *scanPart
		for _, p := range parts {
			// A drained part with more keys must be refilled before
			// the merge can know which key is smallest.
			for len(p.buf) == 0 && p.more {
				if err := sc.fetch(ctx, p); err != nil {
					return nil, fmt.Errorf("scan: %w", err)
				}
			}
			if len(p.buf) > 0 && (best == nil || bytes.Compare(p.buf[0].GetKey(), best.buf[0].GetKey()) < 0) {
				best = p
			}
		}
		if best == nil {
			if opts.Latest {
				return page, nil
			}
			return pinnedPage(parts, page), nil // every shard is exhausted
		}
		page.KVs = append(page.KVs, best.buf[0])
		best.buf[0] = nil
		best.buf = best.buf[1:]
	}
	exhausted := true
	for _, p := range parts {
		if len(p.buf) > 0 || p.more {
			exhausted = false
		}
	}
	if !opts.Latest {
		page = pinnedPage(parts, page)
	}
	if !exhausted {
		page.Next = encodeToken(scanToken{resume: keySuccessor(page.KVs[len(page.KVs)-1].GetKey()), revs: page.Revisions})
	}
	return page, nil
}

// pinnedPage sets page's revisions and watch resume token from parts,
// every one of which has been read (and so pinned) by now. A nil page is
// an empty one.
func pinnedPage(parts []*scanPart, page *ScanPage) *ScanPage {
	if page == nil {
		page = &ScanPage{}
	}
	page.Revisions = make(map[uint64]int64, len(parts))
	next := make(map[uint64]int64, len(parts))
	for _, p := range parts {
		page.Revisions[p.shard] = p.rev
		next[p.shard] = p.rev + 1 // a watch from rev+1 misses nothing after rev
	}
	page.Resume = encodeWatchToken(next)
	return page
}

// scanPart is one shard's cursor in a Scan.
type scanPart struct {
	shard  uint64
	next   []byte // where the next Range starts
	more   bool   // the shard may have keys at or after next
	buf    []*kvpb.KeyValue
	rev    int64 // the revision the shard is read at, once pinned
	pinned bool  // rev is set: the first page of the shard has been read
}

type scanner struct {
	c     *Client
	end   []byte
	batch int
	opts  ScanOptions
}

func (sc *scanner) fetchAll(ctx context.Context, parts []*scanPart) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	errs := make([]error, len(parts))
	for i, p := range parts {
		wg.Go(func() {
			if errs[i] = sc.fetch(ctx, p); errs[i] != nil {
				cancel()
			}
		})
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err // the first failing shard, not the ones cancelled after it
		}
	}
	return nil
}

// fetch reads the next batch of p's shard into p.buf, as of p's pinned
// revision, pinning it at the first read.
func (sc *scanner) fetch(ctx context.Context, p *scanPart) error {
	req := &kvpb.RangeRequest{
		Header: &kvpb.RequestHeader{}, Shard: p.shard, Start: p.next, End: sc.end,
		Limit: int64(sc.batch), Consistency: consistency(sc.opts.Serializable), KeysOnly: sc.opts.KeysOnly,
		Revision: p.rev,
	}
	resp, err := sc.c.rangeShard(ctx, req)
	if err != nil && p.pinned && sc.opts.Serializable && isFutureRevision(err) {
		// A replica behind the pinned revision cannot read as of it; the
		// leader, which served or follows the first page, can.
		req.Header, req.Consistency = &kvpb.RequestHeader{}, kvpb.Consistency_LINEARIZABLE
		resp, err = sc.c.rangeShard(ctx, req)
	}
	if err != nil {
		return fmt.Errorf("shard %d: %w", p.shard, compacted(err))
	}
	if !p.pinned && !sc.opts.Latest {
		p.rev, p.pinned = resp.GetHeader().GetRevision(), true
	}
	kvs := resp.GetKvs()
	more := resp.GetMore()
	if len(kvs) > sc.batch { // a server that ignores limit must not break the memory bound
		kvs, more = kvs[:sc.batch], true
	}
	// Keep only keys in order and in [next, end): the merge relies on it.
	out := kvs[:0]
	prev := p.next
	for _, kv := range kvs {
		k := kv.GetKey()
		if bytes.Compare(k, prev) < 0 || (len(out) > 0 && bytes.Equal(k, prev)) ||
			(len(sc.end) > 0 && bytes.Compare(k, sc.end) >= 0) {
			continue
		}
		out = append(out, kv)
		prev = k
	}
	if more && len(out) == 0 {
		return fmt.Errorf("shard %d: server returned an empty range page with more set", p.shard)
	}
	p.buf, p.more = out, more
	if len(out) > 0 {
		p.next = keySuccessor(out[len(out)-1].GetKey())
	}
	return nil
}

// rangeShard sends req to its shard (any replica when it is serializable)
// until it succeeds, fails for good or ctx ends.
func (c *Client) rangeShard(ctx context.Context, req *kvpb.RangeRequest) (*kvpb.RangeResponse, error) {
	var resp *kvpb.RangeResponse
	r := route{shard: req.GetShard(), anyReplica: req.GetConsistency() == kvpb.Consistency_SERIALIZABLE}
	err := c.invoke(ctx, r, func(ctx context.Context, n *node, epoch uint64) error {
		req.Header.Epoch = epoch
		var err error
		resp, err = n.kv.Range(ctx, req)
		if err == nil {
			c.answered(r.shard, n, resp.GetHeader())
		}
		return err
	})
	return resp, err
}

// isFutureRevision reports whether err is a read at a revision the
// answering replica has not reached (OutOfRange without a compaction
// detail).
func isFutureRevision(err error) bool {
	st, ok := status.FromError(err)
	if !ok || st.Code() != codes.OutOfRange {
		return false
	}
	for _, d := range st.Details() {
		if _, ok := d.(*kvpb.CompactedShard); ok {
			return false
		}
	}
	return true
}

// consistency is the read consistency a serializable flag asks for.
func consistency(serializable bool) kvpb.Consistency {
	if serializable {
		return kvpb.Consistency_SERIALIZABLE
	}
	return kvpb.Consistency_LINEARIZABLE
}

// keySuccessor is the smallest key greater than k.
func keySuccessor(k []byte) []byte {
	s := make([]byte, len(k)+1)
	copy(s, k)
	return s
}

// PrefixEnd returns the end of the range of keys that start with prefix,
// for Scan: the prefix with its last non-0xff byte incremented. It returns
// nil (the end of the key space) when there is none.
func PrefixEnd(prefix []byte) []byte { return keys.PrefixEnd(prefix) }

// Scan tokens: base64url(version | uvarint(len(key)) | key |
// (uvarint shard | uvarint rev)* | crc32(all before)), shards ascending,
// each once: where the scan goes on, and the revision every shard read so
// far is pinned at. The version lets a later client change the format and
// reject old tokens cleanly; the checksum turns truncation and typos into
// ErrInvalidToken.
const tokenVersion = 2

// scanToken is what a scan token carries.
type scanToken struct {
	resume []byte           // the next key to read
	revs   map[uint64]int64 // per shard: the revision it is read at
}

func encodeToken(t scanToken) string {
	shards := slices.Sorted(maps.Keys(t.revs))
	b := make([]byte, 0, 1+binary.MaxVarintLen64*(1+2*len(shards))+len(t.resume)+4)
	b = append(b, tokenVersion)
	b = binary.AppendUvarint(b, uint64(len(t.resume)))
	b = append(b, t.resume...)
	for _, sh := range shards {
		b = binary.AppendUvarint(b, sh)
		b = binary.AppendUvarint(b, uint64(t.revs[sh]))
	}
	b = binary.BigEndian.AppendUint32(b, crc32.ChecksumIEEE(b))
	return base64.RawURLEncoding.EncodeToString(b)
}

// decodeTokenBytes decodes a token's base64url. Go's decoder skips
// newlines, even strict, so "AQ\nEFA" would decode as "AQEFA" does: a
// token is refused unless it is the one encoding of its bytes.
func decodeTokenBytes(tok string) ([]byte, error) {
	if strings.ContainsAny(tok, "\r\n") {
		return nil, fmt.Errorf("%w: a line break inside", ErrInvalidToken)
	}
	return base64.RawURLEncoding.Strict().DecodeString(tok)
}

func decodeToken(tok string) (scanToken, error) {
	var t scanToken
	b, err := decodeTokenBytes(tok)
	if err != nil {
		return t, fmt.Errorf("%w: not base64url", ErrInvalidToken)
	}
	if len(b) < 1+1+4 {
		return t, fmt.Errorf("%w: too short", ErrInvalidToken)
	}
	body, sum := b[:len(b)-4], binary.BigEndian.Uint32(b[len(b)-4:])
	if crc32.ChecksumIEEE(body) != sum {
		return t, fmt.Errorf("%w: checksum mismatch", ErrInvalidToken)
	}
	if body[0] != tokenVersion {
		return t, fmt.Errorf("%w: version %d, want %d", ErrInvalidToken, body[0], tokenVersion)
	}
	n, w := binary.Uvarint(body[1:])
	if w <= 0 || n > uint64(len(body)-1-w) {
		return t, fmt.Errorf("%w: bad length", ErrInvalidToken)
	}
	t.resume = bytes.Clone(body[1+w : 1+w+int(n)])
	t.revs = map[uint64]int64{}
	r := bytes.NewReader(body[1+w+int(n):])
	var prev uint64
	for r.Len() > 0 {
		sh, err1 := binary.ReadUvarint(r)
		rev, err2 := binary.ReadUvarint(r)
		// Shards ascend, each once, and revisions fit an int64: the one
		// encoding encodeToken makes.
		if err1 != nil || err2 != nil || rev > math.MaxInt64 || (len(t.revs) > 0 && sh <= prev) {
			return scanToken{}, fmt.Errorf("%w: bad shard revisions", ErrInvalidToken)
		}
		t.revs[sh], prev = int64(rev), sh
	}
	if encodeToken(t) != tok {
		// Varints have more than one encoding; tokens have one.
		return scanToken{}, fmt.Errorf("%w: not in canonical form", ErrInvalidToken)
	}
	return t, nil
}

// Count returns the number of keys in [start, end) (an empty end: to the
// end of the key space). It sends one count-only Range to every shard, in
// parallel, and sums the answers, so no key or value crosses the wire.
// Like Scan, each shard's count is linearizable (unless serializable) but
// the sum is not a snapshot across shards.
func (c *Client) Count(ctx context.Context, start, end []byte, serializable bool) (int64, error) {
	if c.isClosed() {
		return 0, ErrClosed
	}
	if len(end) > 0 && bytes.Compare(start, end) >= 0 {
		return 0, nil
	}
	shards := c.dataShards()

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	counts := make([]int64, len(shards))
	var (
		wg       sync.WaitGroup
		errOnce  sync.Once
		firstErr error // the first shard to fail, not the ones cancelled after it
	)
	for i, shard := range shards {
		wg.Go(func() {
			resp, err := c.rangeShard(ctx, &kvpb.RangeRequest{
				Header: &kvpb.RequestHeader{}, Shard: shard, Start: start, End: end,
				Consistency: consistency(serializable), CountOnly: true,
			})
			if err != nil {
				errOnce.Do(func() { firstErr = err })
				cancel()
				return
			}
			counts[i] = resp.GetCount()
		})
	}
	wg.Wait()
	if firstErr != nil {
		return 0, fmt.Errorf("count: %w", firstErr)
	}
	var total int64
	for _, n := range counts {
		total += n
	}
	return total, nil
}
