package keys

import (
	"bytes"
	"testing"
)

func TestPrefixEnd(t *testing.T) {
	for _, c := range []struct{ prefix, want []byte }{
		{[]byte("a"), []byte("b")},
		{[]byte("a/"), []byte("a0")},
		{[]byte{'a', 0xff}, []byte("b")},
		{[]byte{0xff, 0xff}, nil},
		{nil, nil},
	} {
		if got := PrefixEnd(c.prefix); !bytes.Equal(got, c.want) || (got == nil) != (c.want == nil) {
			t.Errorf("PrefixEnd(%q) = %q, want %q", c.prefix, got, c.want)
		}
	}
	p := []byte("ab")
	PrefixEnd(p)
	if string(p) != "ab" {
		t.Errorf("PrefixEnd changed its argument to %q", p)
	}
}

func TestQuote(t *testing.T) {
	if got := Quote([]byte("a\x00b")); got != `"a\x00b"` {
		t.Errorf("Quote of a short key = %s", got)
	}
	long := bytes.Repeat([]byte("k"), 1<<20)
	got := Quote(long)
	if want := `"` + string(long[:quoteMax]) + `"... (1048576 bytes)`; got != want {
		t.Errorf("Quote of a 1 MiB key = %s, want %s", got, want)
	}
}
