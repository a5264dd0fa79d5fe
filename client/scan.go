package client

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"sync"

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
	// Token continues a scan: pass the Next of the previous page, with the
	// same start and end. "" starts at start.
	Token string
}

// ScanPage is one page of a Scan.
type ScanPage struct {
	// KVs are in ascending key order, at most Limit of them.
	KVs []*kvpb.KeyValue
	// Next continues the scan (ScanOptions.Token); "" when the range is
	// exhausted.
	Next string
	// Watch is a token for Watch(ctx, prefix, WithPrefix(),
	// WithResume(page.Watch)): it delivers every change made after this
	// page's reads, on every shard, so a reader that loaded a range can
	// follow it without a gap. Each shard's part of the page was read at
	// its own revision; the token starts each shard just after the first
	// read of it in this page (a later page's keys may then come back as
	// events of changes they already show, never the other way round).
	Watch string
}

// Scan returns the keys in [start, end) in key order, one page at a time.
// An empty end means "to the end of the key space"; a prefix scan of p is
// Scan(ctx, p, PrefixEnd(p), ...).
//
// Keys are spread over shards by hash, so Scan asks every shard for its
// part (in parallel, each from the shard's leader unless Serializable) and
// merges them. Each shard's part is linearizable, but the page as a whole is
// not a snapshot across shards, and pages are read at different times: a
// key written between two pages may or may not appear. Memory per page is
// bounded by about twice Limit, however large the range.
func (c *Client) Scan(ctx context.Context, start, end []byte, opts ScanOptions) (*ScanPage, error) {
	if c.isClosed() {
		return nil, ErrClosed
	}
	limit := opts.Limit
	if limit <= 0 {
		limit = DefaultScanLimit
	}
	if opts.Token != "" {
		resume, err := decodeToken(opts.Token)
		if err != nil {
			return nil, fmt.Errorf("scan: %w", err)
		}
		if bytes.Compare(resume, start) < 0 {
			return nil, fmt.Errorf("scan: %w: token is before the start of the range", ErrInvalidToken)
		}
		start = resume
	}
	if len(end) > 0 && bytes.Compare(start, end) >= 0 {
		return &ScanPage{}, nil
	}

	var parts []*scanPart
	for _, shard := range c.dataShards() {
		parts = append(parts, &scanPart{shard: shard, next: start, more: true})
	}
	if len(parts) == 0 {
		return &ScanPage{}, nil
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
			page.Watch = watchAfter(parts)
			return page, nil // every shard is exhausted
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
	if !exhausted {
		page.Next = encodeToken(keySuccessor(page.KVs[len(page.KVs)-1].GetKey()))
	}
	page.Watch = watchAfter(parts)
	return page, nil
}

// watchAfter is the watch token that starts every part's shard after its
// first read in this page.
func watchAfter(parts []*scanPart) string {
	next := make(map[uint64]int64, len(parts))
	for _, p := range parts {
		next[p.shard] = p.rev + 1
	}
	return encodeWatchToken(next)
}

// scanPart is one shard's cursor in a Scan.
type scanPart struct {
	shard uint64
	next  []byte // where the next Range starts
	more  bool   // the shard may have keys at or after next
	buf   []*kvpb.KeyValue
	rev   int64 // the shard's revision at its first read in this page
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

// fetch reads the next batch of p's shard into p.buf.
func (sc *scanner) fetch(ctx context.Context, p *scanPart) error {
	resp, err := sc.c.rangeShard(ctx, &kvpb.RangeRequest{
		Header: &kvpb.RequestHeader{}, Shard: p.shard, Start: p.next, End: sc.end,
		Limit: int64(sc.batch), Consistency: consistency(sc.opts.Serializable), KeysOnly: sc.opts.KeysOnly,
	})
	if err != nil {
		return err
	}
	if p.rev == 0 {
		p.rev = resp.GetHeader().GetRevision()
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
func PrefixEnd(prefix []byte) []byte {
	end := bytes.Clone(prefix)
	for i := len(end) - 1; i >= 0; i-- {
		if end[i] < 0xff {
			end[i]++
			return end[:i+1]
		}
	}
	return nil
}

// Scan tokens: base64url(version | uvarint(len(key)) | key | crc32(all before)).
// The version lets a later client change the format and reject old tokens
// cleanly; the checksum turns truncation and typos into ErrInvalidToken.
const tokenVersion = 1

func encodeToken(resume []byte) string {
	b := make([]byte, 0, 1+binary.MaxVarintLen64+len(resume)+4)
	b = append(b, tokenVersion)
	b = binary.AppendUvarint(b, uint64(len(resume)))
	b = append(b, resume...)
	b = binary.BigEndian.AppendUint32(b, crc32.ChecksumIEEE(b))
	return base64.RawURLEncoding.EncodeToString(b)
}

func decodeToken(tok string) ([]byte, error) {
	b, err := base64.RawURLEncoding.DecodeString(tok)
	if err != nil {
		return nil, fmt.Errorf("%w: not base64url", ErrInvalidToken)
	}
	if len(b) < 1+1+4 {
		return nil, fmt.Errorf("%w: too short", ErrInvalidToken)
	}
	body, sum := b[:len(b)-4], binary.BigEndian.Uint32(b[len(b)-4:])
	if crc32.ChecksumIEEE(body) != sum {
		return nil, fmt.Errorf("%w: checksum mismatch", ErrInvalidToken)
	}
	if body[0] != tokenVersion {
		return nil, fmt.Errorf("%w: version %d, want %d", ErrInvalidToken, body[0], tokenVersion)
	}
	n, w := binary.Uvarint(body[1:])
	if w <= 0 || n != uint64(len(body)-1-w) {
		return nil, fmt.Errorf("%w: bad length", ErrInvalidToken)
	}
	return bytes.Clone(body[1+w:]), nil
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
