package authtoken

import (
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
