package authtoken

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"
)

func TestRenewAt(t *testing.T) {
	now := time.Unix(1000, 0)
	for _, tc := range []struct{ life, before time.Duration }{
		{5 * time.Minute, 30 * time.Second},
		{2 * time.Minute, 30 * time.Second},
		{time.Minute, 15 * time.Second},
		{2 * time.Second, 500 * time.Millisecond},
	} {
		if got := RenewAt(now, now.Add(tc.life)); !got.Equal(now.Add(tc.life - tc.before)) {
			t.Errorf("life %v: renew at %v after fetch, want %v", tc.life, got.Sub(now), tc.life-tc.before)
		}
	}
}

// TestSource: a token is kept until the time its fetch gave, an empty one
// puts nothing on the calls, and a failed fetch is not kept.
func TestSource(t *testing.T) {
	ctx := context.Background()
	var fetches int
	next := func() (string, time.Time, error) { return "", time.Time{}, nil }
	s := &Source{Fetch: func(context.Context) (string, time.Time, error) {
		fetches++
		return next()
	}}
	md := func() (map[string]string, error) { return s.GetRequestMetadata(ctx) }

	next = func() (string, time.Time, error) { return "t1", time.Now().Add(time.Hour), nil }
	for range 3 {
		if m, err := md(); err != nil || m["token"] != "t1" {
			t.Fatalf("metadata %v, %v; want token t1", m, err)
		}
	}
	if fetches != 1 {
		t.Fatalf("%d fetches for three calls with a token an hour from renewal, want 1", fetches)
	}

	s.until = time.Now().Add(-time.Second) // due for renewal
	next = func() (string, time.Time, error) { return "", time.Time{}, errors.New("refused") }
	if _, err := md(); err == nil {
		t.Fatal("a failed fetch gave no error")
	}
	next = func() (string, time.Time, error) { return "", time.Now().Add(time.Hour), nil }
	if m, err := md(); err != nil || m != nil {
		t.Fatalf("metadata %v, %v; want none while the fetch says no token", m, err)
	}
	if fetches != 3 {
		t.Fatalf("%d fetches, want 3: a failed fetch must not be kept", fetches)
	}
	if m, err := md(); err != nil || m != nil || fetches != 3 {
		t.Fatalf("metadata %v, %v after %d fetches; want none, from the kept answer", m, err, fetches)
	}
}

// TestFetchOutlivesItsCaller: a fetch started by a call whose deadline
// ends first runs on, one at a time, and its token serves the calls
// after it; a call waiting on it returns when its own context ends.
func TestFetchOutlivesItsCaller(t *testing.T) {
	release := make(chan struct{})
	var fetches atomic.Int32
	s := &Source{Fetch: func(ctx context.Context) (string, time.Time, error) {
		fetches.Add(1)
		select {
		case <-release:
			return "t1", time.Now().Add(time.Hour), nil
		case <-ctx.Done():
			return "", time.Time{}, ctx.Err()
		}
	}}
	short, cancel := context.WithCancel(context.Background())
	cancel()
	for range 3 { // each gives up at once; one fetch serves them all
		if _, err := s.GetRequestMetadata(short); !errors.Is(err, context.Canceled) {
			t.Fatalf("a call whose context ended got %v, want context.Canceled", err)
		}
	}
	if n := fetches.Load(); n > 1 {
		t.Fatalf("%d fetches under way, want at most one", n)
	}
	got := make(chan map[string]string)
	go func() {
		m, err := s.GetRequestMetadata(context.Background())
		if err != nil {
			t.Error(err)
		}
		got <- m
	}()
	close(release)
	if m := <-got; m["token"] != "t1" {
		t.Fatalf("metadata %v, want token t1 from the fetch the first call started", m)
	}
	if n := fetches.Load(); n != 1 {
		t.Fatalf("%d fetches, want 1", n)
	}
}
