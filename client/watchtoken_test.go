package client

import (
	"errors"
	"testing"
)

func FuzzDecodeWatchToken(f *testing.F) {
	f.Add(encodeWatchToken(map[uint64]int64{1: 5, 3: 100}))
	f.Add("")
	f.Add("AQ")
	f.Fuzz(func(t *testing.T, tok string) {
		next, err := decodeWatchToken(tok)
		if err != nil {
			if !errors.Is(err, ErrInvalidToken) {
				t.Fatalf("error %v is not ErrInvalidToken", err)
			}
			return
		}
		if encodeWatchToken(next) != tok {
			t.Fatalf("accepted a non-canonical token %q", tok)
		}
	})
}
